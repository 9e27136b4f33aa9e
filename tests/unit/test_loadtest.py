"""The load test's pure parts: the load shape, prompts and request mix, outcomes, the
replica parser, and the report builder on a recorded run (tests/data/loadtest_run/)."""

from __future__ import annotations

import csv
import itertools
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fastapi.testclient import TestClient

from loadtest import prompts, shape
from loadtest.observer import parse_serve_details
from loadtest.report import build_report, write_report
from serve_app.api import create_api
from serve_app.errors import NoExpertAvailable, Overloaded
from serve_app.protocol import ChatRequest, CompletionRequest, InferRequest, RouteRequest

RUN = Path(__file__).resolve().parents[1] / "data" / "loadtest_run"
EXPERTS = [
    prompts.Expert("gen-xs", "text-generation"),
    prompts.Expert("gen-s", "text-generation"),
    prompts.Expert("gen-m", "text-generation"),
    prompts.Expert("mask-s", "fill-mask"),
]


def rows(name: str) -> list[dict[str, str]]:
    with (RUN / name).open(newline="") as f:
        return list(csv.DictReader(f))


# --- the load shape -----------------------------------------------------------------------


def test_short_profile_ramps_up_holds_ramps_down_and_idles():
    stages = shape.PROFILES["short"]
    assert [s.name for s in stages] == ["ramp-up", "hold", "ramp-down", "idle"]
    peak = stages[0].users
    assert shape.users_at(stages, 0) == 0
    assert 0 < shape.users_at(stages, stages[0].duration_s / 2) < peak
    hold_start = stages[0].duration_s
    assert shape.users_at(stages, hold_start + 1) == peak
    down_end = hold_start + stages[1].duration_s + stages[2].duration_s
    assert shape.users_at(stages, down_end + 1) == 0
    assert shape.stage_at(stages, down_end + 1).name == "idle"
    assert shape.tick(stages, shape.total_s(stages)) is None
    # make loadtest: the shape plus Ray start-up and shut-down within 5 minutes
    assert shape.total_s(stages) <= 200


def test_user_count_never_jumps_and_tick_spawns_fast_enough():
    stages = shape.PROFILES["short"]
    counts = [shape.users_at(stages, t / 2) for t in range(int(shape.total_s(stages)) * 2)]
    assert max(abs(a - b) for a, b in itertools.pairwise(counts)) <= 1
    users, rate = shape.tick(stages, 40)
    assert users == 16 and rate >= 1


def test_scaled_profile_sets_the_peak():
    stages = shape.scaled(shape.PROFILES["long"], 64)
    assert max(s.users for s in stages) == 64
    assert stages[-1].users == 0
    with pytest.raises(ValueError, match="peak"):
        shape.scaled(stages, 0)


# --- prompts --------------------------------------------------------------------------------


def test_prompt_loader_finds_domains_from_folders_and_rows(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "law" / "deep").mkdir(parents=True)
    (tmp_path / "code" / "a.jsonl").write_text(
        json.dumps({"text": "def f(): pass"}) + "\n\n" + json.dumps({"text": "x = 1"}) + "\n"
    )
    (tmp_path / "law" / "deep" / "b.jsonl").write_text(
        json.dumps({"text": "The lessee shall pay.", "domain": "legal"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["Bonjour le monde"]}), tmp_path / "law" / "c.parquet")
    found = prompts.sample_prompts(tmp_path)
    assert prompts.domains(found) == {"code": 2, "law": 1, "legal": 1}


def test_prompt_loader_cuts_long_texts_and_names_bad_rows(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "word " * 1000}) + "\n")
    assert len(prompts.sample_prompts(data, max_chars=100)[0].text) <= 100
    data.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(prompts.DataError, match=r"d\.jsonl:2"):
        prompts.sample_prompts(data)
    with pytest.raises(prompts.DataError, match="no data"):
        prompts.sample_prompts(tmp_path / "missing")


def test_prompt_loader_samples_per_domain_with_the_projects_loader(tmp_path):
    """The same seeded sample as serve_app.learn.data (profiling, evaluation), per domain."""
    from serve_app.learn import data

    for domain in ("code", "law"):
        (tmp_path / domain).mkdir()
        rows = [json.dumps({"text": f"{domain} prompt {i}"}) for i in range(10)]
        (tmp_path / domain / "a.jsonl").write_text("\n".join(rows) + "\n")
    found = prompts.sample_prompts(tmp_path, per_domain=3, seed=5)
    assert prompts.domains(found) == {"code": 3, "law": 3}
    expected = data.load_prompts(tmp_path, per_domain=3, seed=5)
    assert [(p.text, p.domain) for p in found] == [(p.text, p.domain) for p in expected]
    assert found != prompts.sample_prompts(tmp_path, per_domain=3, seed=6)


def test_stdlib_corpus_is_real_text_in_several_domains():
    found = prompts.sample_prompts(None)
    counts = prompts.domains(found)
    assert set(counts) == set(prompts.STDLIB_DOMAINS)
    assert all(n >= 10 for n in counts.values())
    assert any("def " in p.text for p in found)


def test_request_mix_covers_every_kind_with_valid_bodies():
    rng = random.Random(0)
    prompt = prompts.Prompt.of("The tenant shall pay the rent on the first day.", "legal")
    specs = [prompts.make_request(rng, prompt, EXPERTS) for _ in range(500)]
    assert {s.kind for s in specs} == set(prompts.KINDS)
    schema = {
        "/v1/infer": InferRequest,
        "/v1/route": RouteRequest,
        "/v1/chat/completions": ChatRequest,
        "/v1/completions": CompletionRequest,
    }
    for s in specs:
        schema[s.path].model_validate(s.body)  # the service's own request models
    flagged = [s for s in specs if s.kind == "infer-flag"]
    assert all("[flag:" in s.body["prompt"] for s in flagged)
    masked = [s for s in specs if s.kind == "infer-mask"]
    assert all("[MASK]" in s.body["prompt"] and s.body["experts"] == ["mask-s"] for s in masked)
    allowed = [s for s in specs if s.kind == "infer-experts"]
    assert {len(s.body["experts"]) for s in allowed} == {1, 2}
    assert len({json.dumps(s.body.get("weights")) for s in specs if s.kind == "route"}) > 3
    assert len({s.name for s in specs}) == len(prompts.KINDS)


def test_request_mix_leaves_out_fill_mask_without_a_masked_expert():
    rng = random.Random(1)
    generators = [e for e in EXPERTS if e.task == "text-generation"]
    prompt = prompts.Prompt.of("hello there", "x")
    kinds = {prompts.make_request(rng, prompt, generators).kind for _ in range(300)}
    assert "infer-mask" not in kinds


def test_experts_from_models_reads_the_models_list():
    models = {"object": "list", "data": [{"id": "a", "task": "fill-mask"}, {"id": "b"}]}
    assert prompts.experts_from_models(models) == [
        prompts.Expert("a", "fill-mask"),
        prompts.Expert("b", "text-generation"),
    ]


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {}, "ok"),
        (503, {"Retry-After": "1"}, "rejected"),  # Serve's proxy: a plain-text body
        (429, {"retry-after": "2"}, "rejected"),
        (503, {}, "failure"),
        (500, {"Retry-After": "1"}, "failure"),
        (400, {}, "failure"),
        (0, {}, "failure"),  # Locust's status for a broken connection
    ],
)
def test_outcome_counts_backpressure_apart(status, headers, expected):
    assert prompts.outcome(status, headers) == expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Overloaded("every expert is at its queue limit"), "rejected"),
        (Overloaded("the router is at its queue limit", status=429), "rejected"),
        (NoExpertAvailable("every expert tried failed"), "failure"),
    ],
)
def test_outcome_of_tryage_s_own_503s(error, expected):
    # Through the ingress's real error handler: both answers carry Retry-After, and only
    # load shed on purpose is kept out of the failures.
    api = create_api()

    @api.post("/v1/infer")
    async def infer() -> dict:
        raise error

    answer = TestClient(api).post("/v1/infer", json={})
    assert answer.status_code == error.status and "retry-after" in answer.headers
    assert prompts.outcome(answer.status_code, answer.headers, answer.json()) == expected


def test_rerouted_answers_are_those_with_skipped_experts():
    assert prompts.rerouted({"expert": "gen-s", "skipped": ["gen-xs"]})
    assert not prompts.rerouted({"expert": "gen-xs", "skipped": []})
    assert not prompts.rerouted({"expert": "gen-xs"})  # /v1/route has no skipped
    assert not prompts.rerouted(None)  # not JSON


# --- the replica observer's parser ------------------------------------------------------------


def test_serve_details_give_running_replicas_target_and_minimum():
    details = {
        "applications": {
            "tryage": {
                "deployments": {
                    "gen-s": {
                        "target_num_replicas": 2,
                        "deployment_config": {"autoscaling_config": {"min_replicas": 0}},
                        "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}],
                    },
                    "Ingress": {
                        "target_num_replicas": 1,
                        "deployment_config": {"num_replicas": 1},
                        "replicas": [{"state": "RUNNING"}],
                    },
                }
            }
        }
    }
    samples = parse_serve_details(details, "tryage")
    assert [(s.deployment, s.running, s.target, s.min_replicas) for s in samples] == [
        ("Ingress", 1, 1, 1),
        ("gen-s", 1, 2, 0),
    ]
    assert parse_serve_details(details, "other") == []


# --- the report on a recorded run -------------------------------------------------------------


def test_report_of_the_recorded_run_matches_its_csvs():
    report = build_report(RUN)
    stats = rows("locust_stats.csv")
    endpoints = [r for r in stats if r["Name"] != "Aggregated"]
    assert report["requests"] == sum(int(r["Request Count"]) for r in endpoints)
    assert report["failures"] == sum(int(r["Failure Count"]) for r in endpoints) == 0
    assert report["rejected"] == 0
    assert report["rerouted"] == 0
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    assert report["rps"] > 0
    experts = {"gen-xs", "gen-s", "gen-m", "mask-s"}
    running: dict[str, int] = {}
    for r in rows("replicas.csv"):
        running[r["deployment"]] = max(running.get(r["deployment"], 0), int(r["running"]))
    assert {k: v["max"] for k, v in report["replicas"].items()} == running
    for name in experts:  # up under load, back to zero after it
        assert report["replicas"][name]["max"] >= 1
        assert report["replicas"][name]["final"] == 0
        assert 0 < report["scale_up_s"][name] < report["load_s"]
        assert report["scale_down_s"][name] is not None
    assert set(report["scale_up_s"]) == experts  # router and ingress do not autoscale here


def test_rejected_answers_are_counted_apart_from_failures(tmp_path):
    """Backpressure rows (named '... [rejected]') count as rejected, not as failures; rows of
    answers from a lower-ranked expert ('... [rerouted]') as rerouted successes."""
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    stats = rows("locust_stats.csv")
    rejected = {**stats[0], "Name": "/v1/infer" + prompts.REJECTED, "Request Count": "7"}
    rejected["Failure Count"] = "0"
    rerouted = {**rejected, "Name": "/v1/infer" + prompts.REROUTED, "Request Count": "5"}
    total = stats[-1]
    assert total["Name"] == "Aggregated"
    total["Request Count"] = str(int(total["Request Count"]) + 12)
    with (run / "locust_stats.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(stats[0]))
        writer.writeheader()
        writer.writerows([*stats[:-1], rejected, rerouted, total])
    report = build_report(run)
    assert report["rejected"] == 7
    assert report["rerouted"] == 5
    assert report["failures"] == 0
    assert report["requests"] == build_report(RUN)["requests"] + 12


def test_write_report_writes_json_markdown_and_plot(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    report = write_report(run)
    assert json.loads((run / "report.json").read_text()) == report
    md = (run / "report.md").read_text()
    assert "## Definitions" in md and "Retry-After" in md and "report.png" in md
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_a_folder_without_locust_csvs(tmp_path):
    with pytest.raises(ValueError, match="Aggregated"):
        build_report(tmp_path)


# --- the served copy of a library --------------------------------------------------------------


def test_derived_library_shortens_downscale_delays_and_loads(smoke_library, tmp_path):
    from loadtest.run import derive_library, logical_cpus
    from serve_app.config import load_library

    out = derive_library(smoke_library, tmp_path / "library.yaml", 15.0)
    library = load_library(out)
    for expert in library.experts:
        assert expert.autoscaling["downscale_to_zero_delay_s"] == 15.0
        assert expert.autoscaling["downscale_delay_s"] == 15.0
        assert expert.autoscaling["min_replicas"] == 0
    raw = yaml.safe_load(out.read_text())
    assert all(Path(e["model"]).is_absolute() for e in raw["experts"])
    assert yaml.safe_load(smoke_library.read_text()) != raw  # the original is untouched
    assert logical_cpus(out) >= 3  # router 0.5 + 4 experts x 2 replicas x 0.25 CPU
    assert all(e.max_queued_requests == -1 for e in library.experts)  # the library's own


def test_derived_library_sets_queue_limits_and_the_run_records_them(smoke_library, tmp_path):
    from loadtest.run import derive_library, queue_limits
    from serve_app.config import load_library

    out = derive_library(smoke_library, tmp_path / "library.yaml", None, 2, 16)
    library = load_library(out)
    assert [e.max_queued_requests for e in library.experts] == [2] * len(library.experts)
    assert library.ingress.max_queued_requests == 16
    assert library.experts[0].autoscaling["downscale_to_zero_delay_s"] == 300  # not asked
    limits = queue_limits(out)
    assert limits["max_queued_requests"] == {
        "Ingress": 16,
        "Router": -1,
        **{e.name: 2 for e in library.experts},
    }
    assert limits["backpressure"] == {"status_code": 503, "retry_after_s": 1}


def test_derived_library_scales_out_the_router_and_the_experts(smoke_library, tmp_path):
    from loadtest.run import SCALE_OUT, derive_library
    from serve_app.config import load_library

    short = SCALE_OUT["short"]
    out = derive_library(smoke_library, tmp_path / "library.yaml", 15.0, scale_out=short)
    library = load_library(out)
    router = library.router.autoscaling
    assert (router["min_replicas"], router["max_replicas"]) == (1, 2)
    assert router["downscale_delay_s"] == 15.0
    for expert in library.experts:
        assert expert.autoscaling["max_replicas"] == 3
        assert expert.autoscaling["target_ongoing_requests"] == 0.5
        assert expert.autoscaling["min_replicas"] == 0


def test_derived_library_sets_a_pool_s_replicas_not_its_experts(smoke_library, tmp_path):
    # A pooled expert runs on its pool's replicas: the load test's settings go to the pool.
    from loadtest.run import SCALE_OUT, derive_library, logical_cpus, queue_limits
    from serve_app.config import POOLED_BY_POOL, load_library

    raw = yaml.safe_load(smoke_library.read_text())
    for expert in raw["experts"][2:]:
        expert["pool"] = "tail"
        for key in POOLED_BY_POOL:
            expert.pop(key, None)
    raw["pools"] = {"tail": {"resources": {"num_cpus": 0.25}}}
    raw["router"]["checkpoint"] = str(smoke_library.parent / raw["router"]["checkpoint"])
    for expert in raw["experts"]:
        expert["model"] = str(smoke_library.parent / expert["model"])
    pooled = tmp_path / "pooled.yaml"
    pooled.write_text(yaml.safe_dump(raw))
    load_library(pooled)

    out = derive_library(pooled, tmp_path / "library.yaml", 15.0, 2, None, SCALE_OUT["short"])
    library = load_library(out)
    pool = library.pools["tail"]
    assert pool.max_queued_requests == 2
    assert pool.autoscaling["downscale_to_zero_delay_s"] == 15.0
    assert pool.autoscaling["max_replicas"] == 3
    own = [e for e in library.experts if not e.pool]
    assert len(own) == 2 and all(e.autoscaling["max_replicas"] == 3 for e in own)
    limits = queue_limits(out)["max_queued_requests"]
    assert limits["Pool-tail"] == 2 and not set(limits) & {e.name for e in library.experts[2:]}
    assert logical_cpus(out) >= 3


def test_phases_and_timeline_come_from_the_request_log_and_replicas(tmp_path):
    from loadtest.report import Window, phases, timeline

    run = {"stages": [{"name": "up", "duration_s": 10}, {"name": "idle", "duration_s": 10}]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    lines = ["start,name,response_ms,failed"]
    lines += [f"{100 + i},/v1/route,{10 * (i + 1)},0" for i in range(10)]  # 10..100 ms
    lines += ["112,/v1/infer,500,1"]
    (tmp_path / "requests.csv").write_text("\n".join(lines) + "\n")
    got = phases(tmp_path, Window(100.0, 115.0))
    assert [p["phase"] for p in got] == ["up", "idle"]
    assert got[0]["requests"] == 10 and got[0]["p50_ms"] == 60 and got[0]["p99_ms"] == 100
    assert got[1]["requests"] == 1 and got[1]["failures"] == 1
    replicas = [
        {"time": str(t), "deployment": "gen-s", "running": str(n)}
        for t, n in [(100, 0), (101, 1), (102, 1), (105, 2), (130, 0)]
    ]
    assert timeline(replicas, Window(100.0, 115.0)) == {"gen-s": [[0, 0], [1, 1], [5, 2], [30, 0]]}


def test_the_load_window_starts_where_the_shape_started(tmp_path):
    # Locust's history is in whole seconds and its first user comes about a second after the
    # shape starts: counted from the history, the first requests (the cold starts) would fall
    # before the first phase. With the shape's recorded start, every request is in a phase.
    from loadtest.report import LOAD_START, load_window, phases, window_of

    history = [
        {"Timestamp": str(t), "Name": "Aggregated", "User Count": str(u)}
        for t, u in [(100, 0), (101, 0), (102, 1), (103, 2), (112, 0), (113, 0)]
    ]
    assert load_window(history) == load_window(history, None)
    assert (load_window(history).start, load_window(history).end) == (102.0, 112.0)
    assert load_window(history, 100.9).start == 100.9
    fields = ["Timestamp", "Name", "User Count"]
    lines = [",".join(fields)] + [",".join(r[f] for f in fields) for r in history]
    (tmp_path / "locust_stats_history.csv").write_text("\n".join(lines) + "\n")
    run = {"stages": [{"name": "up", "duration_s": 5}, {"name": "down", "duration_s": 6}]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    requests = ["start,name,response_ms,failed", "101.8,/v1/route,900,0", "109,/v1/route,10,0"]
    (tmp_path / "requests.csv").write_text("\n".join(requests) + "\n")
    assert sum(p["requests"] for p in phases(tmp_path, window_of(tmp_path))) == 1  # lost one
    (tmp_path / LOAD_START).write_text("100.900\n")
    got = phases(tmp_path, window_of(tmp_path))
    assert [p["requests"] for p in got] == [1, 1] and got[0]["p50_ms"] == 900


def test_the_dashboard_token_is_found_where_ray_looks_for_it(tmp_path, monkeypatch):
    from loadtest.observer import ray_auth_headers

    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_auth_headers({}) == {}  # no token anywhere: no header
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert ray_auth_headers({}) == {"Authorization": "Bearer home-token"}
    named = tmp_path / "token"
    named.write_text("file-token")
    env = {"RAY_AUTH_TOKEN_PATH": str(named)}
    assert ray_auth_headers(env) == {"Authorization": "Bearer file-token"}
    env["RAY_AUTH_TOKEN"] = "env-token"
    assert ray_auth_headers(env) == {"Authorization": "Bearer env-token"}


def test_the_application_observed_is_the_only_one_or_tryage():
    # `serve run` names its application "default", serve_config.yaml "tryage".
    from loadtest.observer import pick_app

    assert pick_app({"applications": {"default": {}}}) == "default"
    assert pick_app({"applications": {"tryage": {}, "other": {}}}) == "tryage"
    with pytest.raises(ValueError, match="--app"):
        pick_app({"applications": {"a": {}, "b": {}}})
    with pytest.raises(ValueError, match="none"):
        pick_app({"applications": {}})


def test_a_dashboard_that_cannot_be_read_leaves_the_report_without_replicas(capsys):
    # A service whose dashboard only SSH reaches can still be loaded; the report says less.
    from loadtest.run import observed

    source = observed("http://127.0.0.1:9", None)
    assert source() == []
    assert "no replicas" in capsys.readouterr().err
