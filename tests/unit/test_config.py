"""library.yaml: the good case, and every kind of mistake named by key and file."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from serve_app.config import (
    EXPERT_AUTOSCALING_DEFAULTS,
    ROUTER_AUTOSCALING_DEFAULTS,
    LibraryError,
    load_library,
    minilm_path,
    resolve_model,
)
from serve_app.demo.smoke import SMOKE_EXPERTS

_variants = itertools.count()


@pytest.fixture
def variant(smoke_library) -> Callable[[Callable[[dict], object]], Path]:
    """Write a changed copy of the smoke library next to it, so relative paths still resolve."""

    def write(change: Callable[[dict], object]) -> Path:
        raw = copy.deepcopy(yaml.safe_load(smoke_library.read_text()))
        change(raw)
        path = smoke_library.parent / f"variant-{next(_variants)}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


def _expert(raw: dict, name: str) -> dict:
    return next(e for e in raw["experts"] if e["name"] == name)


# --- the good case -----------------------------------------------------------------------


def test_the_smoke_library_loads_with_every_expert(smoke_library):
    library = load_library(smoke_library)
    assert library.names == [e[0] for e in SMOKE_EXPERTS]
    assert library.expert("mask-s").task == "fill-mask"
    assert library.expert("gen-xs").released == dt.date(2023, 3, 1)
    assert library.expert("gen-s").trusted is False
    assert library.objective.weights == {"size": 0.0, "recency": 0.0}


def test_params_left_out_are_counted_from_the_safetensors_weights(smoke_library):
    library = load_library(smoke_library)
    for expert in library.experts:
        weights = load_file(str(Path(expert.model) / "model.safetensors"))
        assert expert.params == sum(t.numel() for t in weights.values()), expert.name
    sizes = [library.expert(n).params for n in ("gen-xs", "gen-s", "gen-m")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_params_given_in_the_file_are_kept(variant):
    path = variant(lambda raw: _expert(raw, "gen-m").update(params=1_234))
    assert load_library(path).expert("gen-m").params == 1_234


def test_relative_paths_resolve_against_the_file_not_the_working_directory(
    smoke_library, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    library = load_library(smoke_library)
    for expert in library.experts:
        assert Path(expert.model).is_absolute()
        assert Path(expert.model) == smoke_library.parent / "experts" / expert.name
    assert library.router.checkpoint == smoke_library.parent / "router"
    assert library.router.model == str(minilm_path())


def test_a_hub_id_with_params_is_kept_as_a_hub_id(variant):
    path = variant(lambda raw: _expert(raw, "gen-m").update(model="org/some-model", params=10))
    assert load_library(path).expert("gen-m").model == "org/some-model"


def test_experts_scale_to_zero_by_default(smoke_library):
    for expert in load_library(smoke_library).experts:
        assert expert.autoscaling == EXPERT_AUTOSCALING_DEFAULTS
        assert expert.autoscaling["min_replicas"] == 0


def test_expert_autoscaling_fields_are_merged_over_the_defaults(variant):
    path = variant(lambda raw: _expert(raw, "gen-m").update(autoscaling={"max_replicas": 5}))
    scaling = load_library(path).expert("gen-m").autoscaling
    assert scaling["max_replicas"] == 5
    assert scaling["min_replicas"] == 0
    assert scaling["downscale_to_zero_delay_s"] == 300.0


def test_router_autoscaling_and_resources_are_kept_as_written(smoke_library):
    router = load_library(smoke_library).router
    assert router.autoscaling == {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 2.0,
    }
    assert router.resources == {"num_cpus": 0.5}


def test_a_partial_router_autoscaling_is_merged_over_the_defaults(variant):
    # As the experts': raising max_replicas keeps the router's target of 16 (not Serve's 2).
    path = variant(lambda raw: raw["router"].update(autoscaling={"max_replicas": 4}))
    router = load_library(path).router
    assert router.autoscaling == {**ROUTER_AUTOSCALING_DEFAULTS, "max_replicas": 4}
    assert (
        router.serve_options(load_library(path).ingress)["autoscaling_config"][
            "target_ongoing_requests"
        ]
        == 16
    )


def test_the_smoke_router_keeps_one_replica_on_a_gpu():
    from serve_app.demo.smoke import laptop_library

    router = laptop_library([], {"num_gpus": 1})["router"]
    assert router["autoscaling"] == {"min_replicas": 1, "max_replicas": 1}
    assert laptop_library([], {"num_cpus": 0.5})["router"]["autoscaling"]["max_replicas"] == 2


def test_expert_resources_are_passed_through(variant):
    resources = {"num_gpus": 1, "resources": {"big-memory": 1}, "memory": 2**30}
    path = variant(lambda raw: _expert(raw, "gen-m").update(resources=resources))
    library = load_library(path)
    assert library.expert("gen-m").resources == resources
    assert library.expert("gen-xs").resources == {"num_cpus": 0.25}


def _checkpoint_copy(smoke_library: Path, tmp_path: Path, measures: dict | None) -> Path:
    """The smoke library in `tmp_path` with its own copy of the router checkpoint."""
    import shutil

    shutil.copytree(smoke_library.parent, tmp_path / "lib")
    if measures is not None:
        (tmp_path / "lib" / "router" / "measures.json").write_text(json.dumps(measures))
    return tmp_path / "lib" / "library.yaml"


def test_measures_in_the_checkpoint_fill_what_the_library_leaves_out(smoke_library, tmp_path):
    path = _checkpoint_copy(
        smoke_library, tmp_path, {"gen-xs": {"verbosity": 12.5, "readability": 40.0}, "gen-s": {}}
    )
    raw = yaml.safe_load(path.read_text())
    _expert(raw, "gen-s")["verbosity"] = 3.0  # set in the file: the file wins
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    library = load_library(path)
    assert (library.expert("gen-xs").verbosity, library.expert("gen-xs").readability) == (
        12.5,
        40.0,
    )
    assert library.expert("gen-s").verbosity == 3.0
    assert library.expert("gen-m").verbosity is None


def test_a_verbosity_weight_needs_measures_from_the_checkpoint_or_the_file(smoke_library, tmp_path):
    path = _checkpoint_copy(smoke_library, tmp_path, None)
    raw = yaml.safe_load(path.read_text())
    raw["objective"]["weights"]["verbosity"] = 1.0
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(LibraryError, match=r"objective\.weights\.verbosity needs 'verbosity'"):
        load_library(path)
    measured = {e["name"]: {"verbosity": 10.0 + i} for i, e in enumerate(raw["experts"])}
    (path.parent / "router" / "measures.json").write_text(json.dumps(measured))
    assert load_library(path).expert("gen-m").verbosity == 12.0


def test_a_fine_tuned_encoder_inside_the_checkpoint_replaces_router_model(smoke_library, tmp_path):
    path = _checkpoint_copy(smoke_library, tmp_path, None)
    ckpt = path.parent / "router"
    meta = json.loads((ckpt / "router.json").read_text())
    (ckpt / "encoder").mkdir()
    (ckpt / "router.json").write_text(json.dumps({**meta, "encoder": "encoder"}))
    assert load_library(path).router.model == str((ckpt / "encoder").resolve())
    assert load_library(path, router=False).router.model == str(minilm_path())


def test_without_the_router_a_library_loads_before_any_training(smoke_library, tmp_path):
    import shutil

    path = _checkpoint_copy(smoke_library, tmp_path, None)
    shutil.rmtree(path.parent / "router")
    with pytest.raises(LibraryError, match=r"no router\.json"):
        load_library(path)
    assert load_library(path, router=False).names == [e[0] for e in SMOKE_EXPERTS]


def _pooled(raw: dict) -> None:
    """gen-xs and mask-s in a declared pool, gen-s in one left to the defaults."""
    for name, pool in (("gen-xs", "longtail"), ("mask-s", "longtail"), ("gen-s", "spare")):
        expert = _expert(raw, name)
        expert.pop("resources")
        expert["pool"] = pool
    raw["pools"] = {"longtail": {"max_models_per_replica": 2, "autoscaling": {"max_replicas": 3}}}


def test_pooled_experts_are_grouped_by_pool_with_the_pools_serve_options(variant):
    library = load_library(variant(_pooled))
    pooled = library.pooled()
    assert {name: [e.name for e in experts] for name, (_, experts) in pooled.items()} == {
        "longtail": ["gen-xs", "mask-s"],
        "spare": ["gen-s"],
    }
    longtail, spare = pooled["longtail"][0], pooled["spare"][0]
    assert longtail.max_models_per_replica == 2
    options = longtail.serve_options("longtail", library.ingress)
    assert options["name"] == "Pool-longtail"
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["autoscaling_config"]["min_replicas"] == 0  # scale to zero, as experts do
    assert spare.max_models_per_replica == 8  # an undeclared pool gets the defaults
    assert library.expert("gen-m").pool is None


def test_what_the_router_at_its_most_and_a_replica_of_every_expert_reserve(smoke_library, variant):
    # the smoke library: the router 0.5 CPU x 2 replicas, 4 experts x 0.25, the ingress 0
    library = load_library(smoke_library)
    assert library.reserved() == {"CPU": 2.0, "GPU": 0.0}
    assert library.short_of({"CPU": 2.0}) is None
    short = library.short_of({"CPU": 1.5})
    assert "2 CPUs (this Ray has 1.5)" in short and "wait" in short
    # an expert asking for a GPU and no CPUs counts as Ray counts it: one CPU
    gpu = load_library(variant(lambda raw: _expert(raw, "gen-m").update(resources={"num_gpus": 1})))
    assert gpu.reserved() == {"CPU": 2.75, "GPU": 1.0}
    short = gpu.short_of({"CPU": 4.0})
    assert "1 GPUs (this Ray has 0)" in short and "CPU" not in short.split(":")[0]
    # a router that asks for a GPU where there is none: the service cannot even start
    router_gpu = load_library(variant(lambda raw: raw["router"].update(resources={"num_gpus": 1})))
    short = router_gpu.short_of({"CPU": 8.0})
    assert "the router asks for 1 GPU" in short and "cannot start" in short
    assert "the router asks" not in router_gpu.short_of({"CPU": 8.0, "GPU": 1.0})  # 2 replicas
    # a pool counts once, however many experts it serves
    pooled = load_library(variant(_pooled))
    pools = [cfg.serve_options(n, pooled.ingress) for n, (cfg, _) in pooled.pooled().items()]
    per_pool = sum(p["ray_actor_options"].get("num_cpus", 1) for p in pools)
    assert pooled.reserved()["CPU"] == 1.0 + 0.25 + per_pool  # router, gen-m, the two pools


# --- every kind of mistake ---------------------------------------------------------------


def _add_expert(raw: dict) -> None:
    raw["experts"].append({**_expert(raw, "gen-xs"), "name": "gen-xl"})


BAD = [
    ("top-level-key", lambda raw: raw.update(colour="red"), ["colour"]),
    (
        "default-over-limit",
        lambda raw: raw.update(ingress={"openai_default_max_tokens": 600}),
        ["ingress", "openai_default_max_tokens 600 is over max_new_tokens 512"],
    ),
    (
        "expert-key",
        lambda raw: raw["experts"][0].update(colour="red"),
        ["experts[0](gen-xs).colour"],
    ),
    (
        "expert-name",
        lambda raw: raw["experts"][1].update(name="Gen_S"),
        ["experts[1](Gen_S).name", "[a-z0-9-]+"],
    ),
    (
        "duplicate-name",
        lambda raw: raw["experts"][1].update(name="gen-xs"),
        ["experts", "'gen-xs' appears twice"],
    ),
    (
        "task",
        lambda raw: raw["experts"][2].update(task="summarise"),
        ["experts[2](gen-m).task", "text-generation"],
    ),
    (
        "date",
        lambda raw: raw["experts"][1].update(released="2024-13-45"),
        ["experts[1](gen-s).released"],
    ),
    (
        "missing-model",
        lambda raw: raw["experts"][0].update(model="./nowhere"),
        ["experts[0](gen-xs).model", "'./nowhere' does not exist"],
    ),
    (
        "missing-router-model",
        lambda raw: raw["router"].update(model="./no-encoder"),
        ["router.model", "'./no-encoder'"],
    ),
    (
        "hub-id-without-params",
        lambda raw: raw["experts"][2].update(model="org/some-model"),
        ["experts[2](gen-m).params", "set params"],
    ),
    (
        "unknown-weight",
        lambda raw: raw["objective"]["weights"].update(sise=1.0),
        ["objective.weights", "'sise'", "known: size, recency"],
    ),
    (
        "negative-weight",
        lambda raw: raw["objective"]["weights"].update(size=-1.0),
        ["objective.weights", "'size'", ">= 0"],
    ),
    (
        "weight-needs-measurement",
        lambda raw: raw["objective"]["weights"].update(verbosity=1.0),
        ["objective.weights.verbosity", "'verbosity' on every expert"],
    ),
    (
        "autoscaling-value",
        lambda raw: raw["experts"][0].update(autoscaling={"min_replicas": -1}),
        ["experts[0](gen-xs).autoscaling.min_replicas"],
    ),
    (
        "autoscaling-range",
        lambda raw: raw["router"].update(autoscaling={"min_replicas": 3, "max_replicas": 1}),
        ["router.autoscaling", "max_replicas"],
    ),
    (
        "autoscaling-key",
        lambda raw: raw["experts"][0].update(autoscaling={"max_replica": 4}),
        ["experts[0](gen-xs).autoscaling", "'max_replica'", "max_replicas"],
    ),
    (
        "resources-key",
        lambda raw: raw["experts"][3].update(resources={"num_gpu": 1}),
        ["experts[3](mask-s).resources", "'num_gpu'", "num_gpus"],
    ),
    (
        "resources-value",
        lambda raw: raw["router"].update(resources={"num_cpus": -1}),
        ["router.resources.num_cpus"],
    ),
    (
        "checkpoint-without-router-json",
        lambda raw: raw["router"].update(checkpoint="experts"),
        ["router.checkpoint", "no router.json"],
    ),
    (
        "checkpoint-missing-an-expert",
        _add_expert,
        ["router.checkpoint", "gen-xl", "retrain"],
    ),
    (
        "pooled-expert-with-its-own-resources",
        lambda raw: raw["experts"][0].update(pool="longtail"),
        ["experts[0](gen-xs)", "'resources' under pools.longtail"],
    ),
    (
        "pooled-remote-expert",
        lambda raw: raw["experts"][0].update(
            pool="longtail", engine="openai", base_url="http://x/v1", resources={}
        ),
        ["experts[0](gen-xs)", "no weights to pool"],
    ),
    (
        "pool-name",
        lambda raw: raw.update(pools={"Long_Tail": {}}),
        ["pools", "'Long_Tail'", "[a-z0-9-]+"],
    ),
    (
        "pool-key",
        lambda raw: raw.update(pools={"longtail": {"max_models": 3}}),
        ["pools.longtail.max_models"],
    ),
    (
        "expert-pool-name",
        lambda raw: raw["experts"][0].update(pool="Big Pool!", resources={}),
        ["experts[0](gen-xs).pool", "'Big Pool!'", "[a-z0-9-]+"],
    ),
    (
        "pool-serving-no-expert",
        lambda raw: (
            raw["experts"][0].pop("resources"),
            raw["experts"][0].update(pool="long-tail"),
            raw.update(pools={"longtail": {}}),
        ),
        ["pools.longtail serves no expert", "long-tail"],
    ),
    (
        "pool-autoscaling-key",
        lambda raw: raw.update(pools={"longtail": {"autoscaling": {"max_replica": 3}}}),
        ["pools.longtail.autoscaling", "'max_replica'"],
    ),
    (
        "infinite-price",  # /v1/models could not answer it as JSON
        lambda raw: raw["experts"][0].update(price={"input_per_mtok": float("inf")}),
        ["experts[0](gen-xs).price.input_per_mtok", "finite"],
    ),
]


@pytest.mark.parametrize(("change", "named"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_library_is_refused_naming_the_key_and_the_file(variant, change, named):
    path = variant(change)
    with pytest.raises(LibraryError) as err:
        load_library(path)
    message = str(err.value)
    assert str(path) in message
    for part in named:
        assert part in message


def test_a_missing_library_file_is_named(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(LibraryError, match="does not exist") as err:
        load_library(path)
    assert str(path) in str(err.value)


def test_invalid_yaml_is_named_with_the_file(smoke_library):
    path = smoke_library.parent / "broken.yaml"
    path.write_text("router: [unclosed\n")
    with pytest.raises(LibraryError, match="not valid YAML") as err:
        load_library(path)
    assert str(path) in str(err.value)


def test_a_file_that_is_not_a_mapping_is_refused(smoke_library):
    path = smoke_library.parent / "list.yaml"
    path.write_text("- router\n- experts\n")
    with pytest.raises(LibraryError, match="expected a mapping") as err:
        load_library(path)
    assert str(path) in str(err.value)


def test_library_error_is_a_value_error():
    assert issubclass(LibraryError, ValueError)


# --- resolve_model -----------------------------------------------------------------------


def test_minilm_resolves_to_the_packaged_model_folder(tmp_path):
    folder = Path(resolve_model("minilm", tmp_path))
    assert folder == minilm_path()
    assert (folder / "config.json").is_file()


@pytest.mark.parametrize("hub_id", ["sentence-transformers/all-MiniLM-L6-v2", "gpt2"])
def test_a_hub_id_that_is_not_a_path_is_kept(tmp_path, hub_id):
    assert resolve_model(hub_id, tmp_path) == hub_id


def test_an_existing_folder_wins_over_a_hub_id_of_the_same_shape(tmp_path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name", tmp_path) == str(tmp_path / "org" / "name")


@pytest.mark.parametrize("value", ["./gpt2", "/no/such/model", "~/no-such-model-here", "a b"])
def test_a_missing_path_or_a_non_hub_id_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(value, tmp_path)


def test_must_exist_refuses_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("org/name", tmp_path, must_exist=True)


@pytest.mark.parametrize("value", ["experts/code-s", "models/org/name"])
def test_a_path_looking_model_whose_folder_is_missing_is_never_a_hub_lookup(tmp_path, value):
    # `experts/` is beside the library: `experts/code-s` is a local path that went missing,
    # not the Hub id of an organisation called "experts"; three parts are never a Hub id.
    (tmp_path / "experts").mkdir()
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(value, tmp_path)


def test_a_hub_model_can_be_pinned_to_a_revision(variant):
    def pin(raw: dict) -> None:
        raw["experts"].append(
            {
                "name": "hub-lm",
                "model": "org/some-lm",
                "task": "text-generation",
                "params": 1000,
                "released": "2025-01-01",
                "revision": "0123abc",
            }
        )
        raw["router"]["checkpoint"] = "router"

    path = variant(pin)
    library = load_library(path, router=False)
    assert library.expert("hub-lm").revision == "0123abc"
    assert library.expert("hub-lm").model == "org/some-lm"
    assert library.expert("hub-lm").context_length is None  # unknown until it loads


def test_every_local_expert_knows_its_context_length(smoke_library):
    assert {e.context_length for e in load_library(smoke_library).experts} == {256}


def test_a_default_new_tokens_longer_than_an_experts_context_is_refused(variant):
    path = variant(lambda raw: raw.setdefault("ingress", {}).update(default_new_tokens=300))
    with pytest.raises(LibraryError, match=r"ingress\.default_new_tokens is 300.*256"):
        load_library(path)


def test_the_policy_is_validated_naming_the_key(variant):
    path = variant(lambda raw: raw.update(policy={"user_weights": ["size", "sise"]}))
    with pytest.raises(LibraryError, match=r"policy\.user_weights.*'sise'"):
        load_library(path)
    path = variant(lambda raw: raw.update(policy={"trusted_only": True, "user_weights": ["size"]}))
    library = load_library(path)
    assert library.policy.trusted_only and library.policy.settable() == ("size",)
