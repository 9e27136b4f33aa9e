"""The benchmarks run as the docs show and write their figures (each with its own Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.routerdc import SHARED_ROUTING
from serve_app.learn.data import load_prompts
from tests.integration.conftest import ROOT


def bench(*args: str, module: str = "bench.cold_start") -> subprocess.CompletedProcess:
    """Run a benchmark as the docs show: `python -m MODULE ARGS` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # a Ray of its own and a cold start: about 30 s on 2 CPUs
def test_cold_start_bench_writes_its_figures(tmp_path, smoke_library):
    done = bench(
        *("--library", str(smoke_library), "--experts", "gen-xs"),
        *("--repeats", "1", "--out", str(tmp_path)),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| gen-xs |" in done.stdout
    report = json.loads((tmp_path / "cold_start.json").read_text())
    assert list(report["experts"]) == ["gen-xs"]
    (only,) = report["experts"]["gen-xs"]["trials"]
    # A cold request waits for the replica and its model; the warm one right after does not.
    assert only["cold_request_s"] > only["warm_request_s"] > 0
    assert only["cold_start_s"] > only["model_load_s"] > 0


def test_cold_start_bench_refuses_an_unknown_expert(tmp_path, smoke_library):
    done = bench("--library", str(smoke_library), "--experts", "nope", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "unknown expert 'nope'" in done.stderr


@pytest.mark.slow  # a Ray of its own, profiling and evaluating: about a minute on 2 CPUs
def test_pipeline_bench_times_every_stage(tmp_path, smoke_library, real_data):
    done = bench(
        *("--library", str(smoke_library), "--data", str(real_data)),
        *("--per-domain", "2", "--out", str(tmp_path)),
        module="bench.pipeline",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "pipeline.json").read_text())
    domains = {p.domain for p in load_prompts(real_data)}
    assert report["prompts"] == 2 * len(domains)
    assert set(report["rows_per_s"]) == {"gen-xs", "gen-s", "gen-m", "mask-s"}
    for stage in ("profile_s", "train_s", "evaluate_s"):
        assert report[stage] > 0
    assert "| profile |" in done.stdout


@pytest.mark.slow  # a Ray of its own, 8 experts built, profiled, trained and served: ~2 min
def test_pool_bench_serves_a_pool_and_writes_its_figures(tmp_path):
    done = bench(
        *("--experts", "8", "--slots", "2", "--requests", "24", "--cold", "2"),
        *("--base-steps", "20", "--tune-steps", "3", "--out", str(tmp_path)),
        module="bench.pool",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "pool.json").read_text())
    assert report["router"]["outputs"] == 8
    traffic = report["traffic"]
    assert traffic["failures"] == 0 and traffic["pool_requests"] == 24
    assert 0 < traffic["hit_rate"] < 1  # 8 experts, 4 slots: some requests wait for a load
    assert len(report["memory_mb"]) == 2  # both pool replicas answered
    assert all(m["experts_held"] <= 2 for m in report["memory_mb"].values())


@pytest.mark.slow  # a Ray of its own and the smoke library served: about a minute
def test_route_latency_bench_writes_both_sides_and_where_the_time_goes(tmp_path):
    done = bench(
        *("--requests", "20", "--clients", "4", "--seconds", "3", "--warmup", "0"),
        *("--out", str(tmp_path)),
        module="bench.route_latency",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "route_latency.json").read_text())
    served = report["served"]
    assert report["same_decisions_as_offline"] is True
    assert served["p50_ms"] > served["router_model_ms"] > 0  # the model is part of a decision
    assert served["router_threads"] == 1  # the smoke library's router.threads
    assert served["p50_ms"] > served["http_only_p50_ms"] > 0
    assert served["concurrent"]["failures"] == 0
    assert isinstance(served["concurrent"]["scaled_out"], bool)
    encoder = report["encoder"]
    assert encoder["p50_ms_in_ray"] > 0  # the same encoder inside a Ray worker
    # The smoke router runs one torch thread: the floor is also measured at that count.
    assert encoder["threads"] == 1 or encoder["p50_ms_router_threads"] > encoder["p50_ms"] > 0


def test_routerdc_bench_says_it_skipped_without_the_data(tmp_path):
    results, docs = tmp_path / "routerdc.json", tmp_path / "docs"
    done = bench(
        *("--data", str(tmp_path / "absent"), "--work", str(tmp_path / "work")),
        *("--results", str(results), "--docs", str(docs)),
        module="bench.routerdc",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "no RouterDC data at" in done.stderr and "skipped" in done.stderr
    assert not results.exists() and not docs.exists()


@pytest.mark.slow  # RouterDC's rows, 30 a task: import, train, route, score; about 30 s
@pytest.mark.skipif(not SHARED_ROUTING.is_dir(), reason="../shared/routing is not here")
def test_routerdc_bench_writes_its_figures_and_page_on_a_slice(tmp_path):
    results, docs = tmp_path / "routerdc.json", tmp_path / "docs"
    done = bench(
        *("--limit", "30", "--work", str(tmp_path / "work")),
        *("--results", str(results), "--docs", str(docs)),
        module="bench.routerdc",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(results.read_text())
    assert set(report["rows"]["test"].values()) == {30}
    assert report["router"]["routed"] == sum(report["rows"]["test"].values())
    avg, se = report["average"], report["standard_error"]
    assert set(avg) == set(se) == {"router", "knn", "best_single", "task_best", "oracle"}
    assert all(avg[m] <= avg["oracle"] for m in avg)  # no choice beats the best per prompt
    assert all(0 < se[m] < 20 for m in ("router", "knn", "best_single"))
    assert set(report["router_minus_se"]) == {"knn", "best_single", "task_best", "oracle"}
    page = (docs / "routerdc.md").read_text()
    assert f"**{avg['router']:.2f}**" in page and f"± {se['router']:.2f}" in page
    assert f"**{avg['task_best']:.2f}**" in page and "*Told the task* is not a router" in page
    assert (docs / "routerdc.png").stat().st_size > 10_000
