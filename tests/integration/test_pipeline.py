"""The router-learning pipeline from the command line: profile, train, evaluate, pareto.

A smoke library (random experts) and real prompts, 6 per domain (30 over five domains from
../shared/corpora, or standard-library text where the corpora are absent); Ray is the session's
local instance (the commands use it when it is up, as they would a cluster's).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from serve_app.cli import main
from serve_app.config import load_library
from serve_app.learn.data import load_prompts
from serve_app.learn.profile import PROFILE_SCHEMA, read_profile

GENERATE = 4
#: Where the profile goes: the library's profiles folder, as the demo build writes it.
PROFILE = Path("lib/profiles/router.parquet")


@pytest.fixture(scope="module")
def pipeline(serve_port, smoke_library, real_data, tmp_path_factory):
    """Run profile then train on a copy of the smoke library; return its folder."""
    folder = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(smoke_library.parent, folder / "lib")
    lib = folder / "lib" / "library.yaml"
    (folder / "library.before").write_bytes(lib.read_bytes())
    common = ["--library", str(lib), "--data", str(real_data)]
    profile_args = [
        "profile",
        *common,
        "--out",
        str(folder / PROFILE),
        "--generate",
        str(GENERATE),
        "--new-tokens",
        "8",
    ]
    assert main(profile_args) == 0
    assert main(["train", "--library", str(lib), "--profile", str(folder / PROFILE)]) == 0
    return folder, lib, common, profile_args


def test_the_profile_has_one_row_per_prompt_and_expert_in_the_documented_schema(
    pipeline, real_data
):
    folder, lib, _, _ = pipeline
    table = read_profile(folder / PROFILE)
    prompts = load_prompts(real_data)
    experts = load_library(lib).names
    assert table.schema.remove_metadata() == PROFILE_SCHEMA
    assert table.num_rows == len(prompts) * len(experts)
    assert len(prompts) == 6 * len({p.domain for p in prompts})
    rows = table.to_pylist()
    assert {(r["prompt_id"], r["expert"]) for r in rows} == {
        (p.id, e) for p in prompts for e in experts
    }
    assert {r["domain"] for r in rows} == {p.domain for p in prompts}
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0 < r["bytes"] <= len(r["text"].encode()) and r["tokens"] > 0
        assert r["seconds"] > 0
    outputs = [r for r in rows if r["output"] is not None]
    # A sample of prompts, continued by every text-generation expert (not the fill-mask one).
    assert len({r["prompt_id"] for r in outputs}) == GENERATE
    assert {r["expert"] for r in outputs} == {"gen-xs", "gen-s", "gen-m"}


def test_profile_then_train_leave_the_library_file_byte_identical(pipeline):
    folder, lib, _, _ = pipeline
    assert lib.read_bytes() == (folder / "library.before").read_bytes()
    assert not list(lib.parent.glob(".*tmp*")), "no temporary checkpoint left beside it"


def test_the_measured_verbosity_and_readability_come_with_the_checkpoint(pipeline):
    _, lib, _, _ = pipeline
    library = load_library(lib)
    for expert in library.experts:
        if expert.task == "text-generation":
            assert expert.verbosity is not None and expert.verbosity >= 0
        else:
            assert expert.verbosity is None and expert.readability is None


def test_a_rerun_reuses_every_measured_row(pipeline, real_data, capsys):
    folder, _, _, profile_args = pipeline
    capsys.readouterr()
    assert main(profile_args) == 0
    rows = len(load_prompts(real_data)) * 4
    assert f"(0 measured now, {rows} reused)" in capsys.readouterr().out
    # Sampling two more prompts for generation re-measures those rows on the three writers.
    more = [*profile_args[:-3], str(GENERATE + 2), *profile_args[-2:]]
    assert main(more) == 0
    assert f"(6 measured now, {rows - 6} reused)" in capsys.readouterr().out
    table = read_profile(folder / PROFILE)
    assert table.num_rows == rows
    written = {r["prompt_id"] for r in table.to_pylist() if r["output"] is not None}
    assert len(written) == GENERATE + 2


def test_training_writes_the_checkpoint_the_library_points_at(pipeline, real_data):
    folder, lib, _, _ = pipeline
    report = json.loads((folder / "lib" / "router" / "report.json").read_text())
    assert report["n_train"] + report["n_val"] == len(load_prompts(real_data))
    assert report["val_error"] < report["untrained_val_error"]
    assert set(report["val"]) == {"top1", "regret", "mean_loss", "scored"}
    assert set(report["expert_mae"]) == set(load_library(lib).names)
    raw = yaml.safe_load(lib.read_text())
    assert (lib.parent / raw["router"]["checkpoint"] / "reference.safetensors").is_file()


def test_evaluate_prints_the_contract_json(pipeline, real_data, capsys):
    _, _, common, _ = pipeline
    capsys.readouterr()
    # The router was trained on these very prompts: evaluation leaves them out unless told.
    assert main(["evaluate", *common, "--json", "--quiet"]) == 2
    assert "every prompt in" in capsys.readouterr().err
    assert main(["evaluate", *common, "--json", "--quiet", "--include-trained"]) == 0
    printed = capsys.readouterr()
    out = json.loads(printed.out)
    # Every row was measured by the training profile, with the same weights: none again.
    rows = len(load_prompts(real_data)) * len(out["experts"])
    assert f"0 rows measured now, {rows} of {rows} measured before with the same" in printed.err
    prompts = load_prompts(real_data)
    assert out["n"] == len(prompts)
    assert out["experts"] == ["gen-xs", "gen-s", "gen-m", "mask-s"]
    assert set(out["router"]) == {"top1", "regret", "mean_loss", "scored"}
    assert set(out["baselines"]) == {"oracle", "random", "best_single", "model_card", "knn"}
    assert out["baselines"]["oracle"]["top1"] == 1.0
    assert out["baselines"]["oracle"]["regret"] == 0.0
    assert set(out["per_domain"]) == {p.domain for p in prompts}
    for figures in out["per_domain"].values():
        assert figures["n"] == 6
        assert 0 <= figures["router_top1"] <= 1


def test_pareto_writes_csv_and_plot_consistent_with_evaluate(pipeline, capsys):
    folder, _, common, _ = pipeline
    capsys.readouterr()
    # A verbosity sweep compares the experts that write: the text-generation ones.
    tg = ["--quiet", "--include-trained", "--task", "text-generation"]
    assert main(["evaluate", *common, "--json", *tg]) == 0
    router = json.loads(capsys.readouterr().out)["router"]
    out = folder / "pareto"
    assert main(["pareto", *common, "--weight", "verbosity", "--out", str(out), *tg[:2]]) == 0
    printed = capsys.readouterr().out
    assert "verbosity 0 keeps 100% of the quality" in printed
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    zero = next(r for r in rows if r["kind"] == "router" and float(r["weight"]) == 0)
    assert float(zero["mean_loss"]) == pytest.approx(router["mean_loss"])
    assert float(zero["top1"]) == pytest.approx(router["top1"])
    assert {r["label"] for r in rows if r["kind"] == "expert"} == {"gen-xs", "gen-s", "gen-m"}
    assert (out / "pareto.png").stat().st_size > 10_000


def test_bad_arguments_fail_with_a_message(pipeline, tmp_path, capsys):
    _, lib, _, _ = pipeline
    assert main(["evaluate", "--library", str(lib), "--data", str(tmp_path / "none")]) == 2
    assert "no data at" in capsys.readouterr().err
    code = main(
        [
            "pareto",
            "--library",
            str(lib),
            "--data",
            str(tmp_path),
            "--weight",
            "sise",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "unknown weight 'sise'" in capsys.readouterr().err


def test_routing_uses_the_measured_verbosity_and_readability(pipeline, tmp_path):
    # `tryage route`: the served router's predictions and the ingress's objective, offline
    # (test_http checks, row by row, that its decisions are the service's), on the library
    # the profile measured.
    _, lib, _, _ = pipeline
    writers = [e for e in load_library(lib).experts if e.task == "text-generation"]
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"text": "[flag: concise] Once upon a time", "domain": "d"}) + "\n")
    args = ["route", "--library", str(lib), "--data", str(data)]
    assert main([*args, "--out", str(tmp_path / "concise.jsonl")]) == 0
    chosen = json.loads((tmp_path / "concise.jsonl").read_text())["expert"]
    assert chosen == min(writers, key=lambda e: e.verbosity).name
    data.write_text(json.dumps({"text": "Once upon a time", "domain": "d"}) + "\n")
    assert main([*args, "--weight", "readability=100", "--out", str(tmp_path / "r.jsonl")]) == 0
    known = [e for e in writers if e.readability is not None]
    assert (
        json.loads((tmp_path / "r.jsonl").read_text())["expert"]
        == max(known, key=lambda e: e.readability).name
    )


@pytest.mark.slow  # an actor of its own for four experts: about 20 s on 2 CPUs (-m slow);
# test_profile.py checks its scorer against each expert's own, without Ray, in the default run
def test_pooled_experts_are_profiled_by_their_pool_with_the_same_losses(pipeline, tmp_path):
    # Every expert in a pool whose one actor holds one expert at a time: each is loaded on
    # demand by the same actor (one process started, not four), and measures what its own
    # actor measured.
    folder, lib, _, profile_args = pipeline
    raw = yaml.safe_load(lib.read_text())
    for expert in raw["experts"]:
        expert.pop("resources")
        expert["pool"] = "longtail"
    raw["pools"] = {"longtail": {"max_models_per_replica": 1, "autoscaling": {"max_replicas": 1}}}
    pooled = lib.with_name("library-pooled.yaml")
    pooled.write_text(yaml.safe_dump(raw, sort_keys=False))
    args = [*profile_args]
    args[args.index("--library") + 1] = str(pooled)
    args[args.index("--out") + 1] = str(tmp_path / "pooled.parquet")
    assert main(args) == 0

    def rows(path) -> dict:
        return {(r["prompt_id"], r["expert"]): r for r in read_profile(path).to_pylist()}

    own, by_pool = rows(folder / PROFILE), rows(tmp_path / "pooled.parquet")
    assert by_pool.keys() == own.keys()
    for key, row in by_pool.items():
        assert row["loss"] == pytest.approx(own[key]["loss"], rel=1e-6), key
        assert row["bytes"] == own[key]["bytes"], key
        if row["output"] is not None:  # an earlier test may have sampled more prompts there
            assert row["output"] == own[key]["output"], key
    assert sum(r["output"] is not None for r in by_pool.values()) == GENERATE * 3  # 3 writers
