"""Cold-start benchmark: how long a request waits when its expert is at zero replicas.

    python -m bench.cold_start [--library FILE] [--repeats N] [--experts a,b] [--out DIR]

Serves the library on a local Ray (the smoke library, built in a temporary folder, when none is
given) with a short idle window, then for every expert, N times: wait until the expert is at
zero replicas, send it one request (cold), send the same request again (warm), and ask the
replica how long its model took to load. Per trial:

    cold_start_s   = cold_request_s - warm_request_s    what a cold start adds to a request
    model_load_s   = the replica constructor's model load, timed in the replica
    replica_start_s = cold_start_s - model_load_s        autoscaler reaction, scheduling, worker
                                                         process start and imports

Prints a table of medians and writes every trial to `OUT/cold_start.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from serve_app.session import machine_info, serving

ROOT = Path(__file__).resolve().parents[1]
# Scale to zero a second after the last request; metrics reported often enough to notice.
# (Ray 2.60 still reads the deprecated `metrics_interval_s` for how often handles report.)
FAST_IDLE = {
    "max_replicas": 1,
    "downscale_delay_s": 1.0,
    "downscale_to_zero_delay_s": 1.0,
    "look_back_period_s": 2.0,
    "metrics_interval_s": 0.5,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.cold_start", description=__doc__.split("\n")[0])
    p.add_argument("--library", type=Path, help="library.yaml (default: a fresh smoke library)")
    p.add_argument("--repeats", type=int, default=3, help="cold starts per expert (default 3)")
    p.add_argument("--experts", help="comma-separated expert names (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output folder")
    p.add_argument("--deadline-s", type=float, default=120, help="longest wait for a scale-down")
    return p.parse_args(argv)


def request_for(expert: Any) -> dict[str, Any]:
    """A small /v1/infer request pinned to `expert`."""
    if expert.task == "fill-mask":
        return {"prompt": "The [MASK] sat on the mat.", "experts": [expert.name], "top_k": 1}
    return {"prompt": "Once upon a time", "experts": [expert.name], "max_new_tokens": 4}


def running(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_for_zero(app: str, name: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while running(app, name) > 0:
        if time.monotonic() > end:
            raise TimeoutError(f"{name} did not scale to zero within {deadline_s} s")
        time.sleep(0.1)


def trial(client: Any, app: str, expert: Any, deadline_s: float) -> dict[str, float]:
    """One cold request and one warm request to `expert`, from zero replicas."""
    from ray import serve

    wait_for_zero(app, expert.name, deadline_s)
    body = request_for(expert)
    times = []
    for _ in range(2):  # cold, then warm
        start = time.perf_counter()
        r = client.post("/v1/infer", json=body)
        times.append(time.perf_counter() - start)
        if r.status_code != 200 or r.json()["expert"] != expert.name:
            raise RuntimeError(f"{expert.name}: request failed: {r.status_code} {r.text[:300]}")
    info = serve.get_deployment_handle(expert.name, app_name=app).info.remote().result()
    cold, warm = times
    return {
        "cold_request_s": cold,
        "warm_request_s": warm,
        "cold_start_s": cold - warm,
        "model_load_s": info["load_s"],
        "replica_start_s": cold - warm - info["load_s"],
    }


def summarise(trials: list[dict[str, float]]) -> dict[str, float]:
    """Median, min and max of every figure over the trials."""
    out: dict[str, float] = {}
    for key in trials[0]:
        values = [t[key] for t in trials]
        out[key] = round(statistics.median(values), 3)
        out[f"{key}_min"] = round(min(values), 3)
        out[f"{key}_max"] = round(max(values), 3)
    return out


def run(library_path: Path, names: list[str], repeats: int, deadline_s: float) -> dict:
    """Serve the library on a fresh local Ray and time `repeats` cold starts of each expert
    named (all when `names` is empty)."""
    import httpx
    from tqdm import tqdm

    from serve_app.app import build_graph
    from serve_app.config import load_library

    library = load_library(library_path)
    experts = [library.expert(n) for n in names] if names else library.experts
    # A pooled expert has no deployment of its own to cold-start (bench.pool measures loads).
    experts = [e for e in experts if e.pool is None]
    fast = [e.model_copy(update={"autoscaling": {**e.autoscaling, **FAST_IDLE}}) for e in experts]
    others = [e for e in library.experts if e.name not in {x.name for x in fast}]
    library = library.model_copy(update={"experts": fast + others})

    load_before = os.getloadavg()[0]  # a busy machine slows every cold start: report it too
    app = "cold-start-bench"
    serve_it = serving(build_graph(library), name=app, address="local", include_dashboard=False)
    with serve_it as url:
        results: dict[str, Any] = {}
        with (
            httpx.Client(base_url=url, timeout=600) as client,
            tqdm(total=repeats * len(fast), desc="cold starts", unit="start") as bar,
        ):
            for expert in fast:
                trials = []
                for _ in range(repeats):
                    trials.append(trial(client, app, expert, deadline_s))
                    bar.update()
                results[expert.name] = {
                    "params": expert.params,
                    "resources": expert.resources,
                    "median": summarise(trials),
                    "trials": trials,
                }
    return {
        "library": str(library_path),
        "repeats": repeats,
        "machine": {**machine_info(), "load_average_1m_before": load_before},
        "experts": results,
    }


def table(report: dict) -> str:
    """The medians as a Markdown table, in seconds."""
    cols = ["cold_request_s", "warm_request_s", "cold_start_s", "model_load_s", "replica_start_s"]
    lines = [
        "| expert | params | " + " | ".join(c.removesuffix("_s") for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for name, r in report["experts"].items():
        figures = " | ".join(f"{r['median'][c]:.2f}" for c in cols)
        lines.append(f"| {name} | {r['params']:,} | {figures} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        print("bench.cold_start: --repeats must be at least 1", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*metrics_interval_s.*")
    from serve_app.config import LibraryError, load_library

    names = args.experts.split(",") if args.experts else []
    with tempfile.TemporaryDirectory() as tmp:
        library = args.library
        if library is None:
            from serve_app.demo.smoke import build_smoke_library

            print("building the smoke library ...", file=sys.stderr)
            library = build_smoke_library(Path(tmp) / "smoke")
        try:
            known = load_library(library).names
        except LibraryError as err:
            print(f"bench.cold_start: {err}", file=sys.stderr)
            return 2
        unknown = [n for n in names if n not in known]
        if unknown:
            print(
                f"bench.cold_start: unknown expert {unknown[0]!r}; known: {', '.join(known)}",
                file=sys.stderr,
            )
            return 2
        report = run(library, names, args.repeats, args.deadline_s)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cold_start.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(
        f"median of {args.repeats} cold starts per expert, seconds (every trial in {path}); "
        f"{m['cpus']} CPUs, load average {m['load_average_1m_before']:.1f} -> "
        f"{m['load_average_1m']:.1f}:"
    )
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
