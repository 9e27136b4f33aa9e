"""Route-latency benchmark: what `/v1/route` adds to the router's own encoder, in one run.

    python -m bench.route_latency [--library FILE] [--requests N] [--clients C] [--seconds S]
                                  [--out DIR]

Serves the library (the smoke library, built in a temporary folder, when none is given; its
router is the packaged all-MiniLM-L6-v2) on a local Ray, and measures on the same machine:

floor     the encoder's own forward pass in this process, one prompt at a time (p50), and its
          batched throughput (batches of C prompts, prompts a second)
served    `/v1/route` over HTTP: one client sending N requests one after another (p50, p99),
          then C clients at once for S seconds (decisions a second), once the router has
          scaled out to its max_replicas under that load (at most --warmup seconds)
where     the router's model inside its replica (mean a prompt, timed by the replica), the
          encoder alone inside a Ray worker with the floor's threads (p50), and the
          proxy and ingress with no model behind them (GET /v1/models, p50)

and writes OUT/route_latency.json with the two figures the product aims at:

    overhead_ms      = served p50 - encoder p50            (goal: at most 5 ms)
    throughput_share = served decisions/s / encoder batched prompts/s   (goal: at least 0.7)

The prompts are real text of several lengths (the standard library's docstrings), the same on
both sides, so the decisions are those of the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve_app.session import machine_info, serving

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_GOAL_MS = 5.0
SHARE_GOAL = 0.7


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.route_latency", description=__doc__.split("\n")[0])
    p.add_argument("--library", type=Path, help="library.yaml (default: a fresh smoke library)")
    p.add_argument("--requests", type=int, default=200, help="sequential requests (default 200)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=20, help="concurrent phase length")
    p.add_argument(
        "--warmup",
        type=float,
        default=60,
        help="most seconds of load waiting for the router "
        "to scale out before the concurrent phase (default 60; 0: none)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output folder")
    return p.parse_args(argv)


def prompts(n: int) -> list[str]:
    """n real prompts of 100-600 characters, in a fixed order."""
    from serve_app.learn.data import cut_text, stdlib_prompts

    texts = [cut_text(p.text, 600) for p in stdlib_prompts(min_chars=100)]
    return [texts[i % len(texts)] for i in range(n)]


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_by_one(encoder: Any, texts: list[str]) -> list[float]:
    """Seconds the encoder takes on each text, one at a time."""
    times = []
    for t in texts:
        start = time.perf_counter()
        encoder.encode([t])
        times.append(time.perf_counter() - start)
    return times


def encoder_floor(library: Any, texts: list[str], batch: int) -> dict[str, float]:
    """The encoder alone, in this process with torch's threads (the machine's cores): p50 of
    one prompt, and prompts/s in batches; and the p50 with the router's own `threads`, where
    the library sets them (p50_ms_router_threads)."""
    import torch

    from serve_app.router import Encoder, read_head_config

    head = read_head_config(library.router.checkpoint)
    encoder = Encoder(library.router.model, max_length=head.max_length)
    encoder.encode(texts[:batch])  # warm up
    own: dict[str, float] = {}
    threads = torch.get_num_threads()
    if library.router.threads and library.router.threads != threads:
        torch.set_num_threads(library.router.threads)
        try:
            own["p50_ms_router_threads"] = 1000 * statistics.median(one_by_one(encoder, texts))
        finally:
            torch.set_num_threads(threads)
    single = one_by_one(encoder, texts)
    start, done, i = time.perf_counter(), 0, 0
    while time.perf_counter() - start < 10:
        chunk = texts[i * batch : (i + 1) * batch]
        encoder.encode(chunk)
        done += len(chunk)
        i = (i + 1) % max(1, len(texts) // batch)
    return {
        "threads": threads,
        "p50_ms": 1000 * statistics.median(single),
        "p99_ms": 1000 * quantile(single, 0.99),
        "batched_prompts_per_s": done / (time.perf_counter() - start),
        **own,
    }


async def timed_routes(http: Any, texts: list[str]) -> tuple[list[float], list[str]]:
    """`/v1/route` for each text, one after another: each request's seconds, and the expert
    it chose."""
    times, chosen = [], []
    for t in texts:
        start = time.perf_counter()
        r = await http.post("/v1/route", json={"prompt": t})
        times.append(time.perf_counter() - start)
        r.raise_for_status()
        chosen.append(r.json()["expert"])
    return times, chosen


def router_replicas() -> int:
    """The router deployment's running replicas."""
    from ray import serve

    status = serve.status().applications["tryage"].deployments["Router"]
    return int(status.replica_states.get("RUNNING", 0))


async def served(
    url: str, texts: list[str], clients: int, seconds: float, replicas: int, warmup: float
) -> dict[str, Any]:
    """/v1/route: sequential latency, then `clients` concurrent clients for `seconds`, once
    the router has scaled out to `replicas` under the same load (or `warmup` s have passed)."""
    import httpx
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name="tryage")
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for t in texts[:10]:  # warm up
            (await http.post("/v1/route", json={"prompt": t})).raise_for_status()
            (await http.get("/v1/models")).raise_for_status()
        before = await router.stats.remote()
        single, chosen = await timed_routes(http, texts)
        after = await router.stats.remote()
        # The same proxy and ingress with no model behind them: GET /v1/models.
        http_only = []
        for _ in texts:
            start = time.perf_counter()
            (await http.get("/v1/models")).raise_for_status()
            http_only.append(time.perf_counter() - start)
    prompts_run = after["prompts"] - before["prompts"]
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        latencies: list[float] = []
        failures = 0

        async def client(k: int, stop: float, record: bool) -> None:
            nonlocal failures
            i = k
            while time.perf_counter() < stop:
                start = time.perf_counter()
                r = await http.post("/v1/route", json={"prompt": texts[i % len(texts)]})
                if r.status_code != 200:  # a refused request is no decision
                    failures += record
                elif record:
                    latencies.append(time.perf_counter() - start)
                i += clients

        # Warm-up under the same load until the router has scaled out (Serve's autoscaler
        # hears of the load every few seconds): the figure is the steady state.
        async def load(s: float) -> None:
            await asyncio.gather(
                *(client(k, time.perf_counter() + s, False) for k in range(clients))
            )

        warm_start = time.perf_counter()
        while router_replicas() < replicas and time.perf_counter() - warm_start < warmup:
            await load(2)
        if warmup and replicas > 1 and router_replicas() >= replicas:
            await load(3)  # the new replica's first batches (allocations, caches) are not timed
        warmup_s = time.perf_counter() - warm_start
        scaled = router_replicas()
        start = time.perf_counter()
        await asyncio.gather(*(client(k, start + seconds, True) for k in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "p50_ms": 1000 * statistics.median(single),
        "p99_ms": 1000 * quantile(single, 0.99),
        "chosen": chosen,
        # Where the time goes, one client: the router's model inside its replica (mean per
        # prompt), and proxy + ingress alone (p50 of GET /v1/models).
        "router_model_ms": 1000 * (after["model_s"] - before["model_s"]) / max(1, prompts_run),
        "router_threads": after["threads"],  # torch threads of the replica that answered
        "http_only_p50_ms": 1000 * statistics.median(http_only),
        "concurrent": {
            "clients": clients,
            "router_replicas": scaled,
            "scaled_out": scaled >= replicas,
            "warmup_s": warmup_s,
            "decisions": len(latencies),
            "failures": failures,
            "decisions_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * quantile(latencies, 0.99),
        },
    }


def encoder_in_ray(library: Any, texts: list[str], threads: int) -> float:
    """p50 (ms) of the same encoder, one prompt at a time, in a Ray worker that reserves no
    CPU (as the router's replica does) with `threads` torch threads: what running inside Ray
    costs the model on this machine, before any HTTP or handle."""
    import ray

    @ray.remote(num_cpus=0)
    def timed(model: str, max_length: int) -> float:
        import torch

        from serve_app.router import Encoder

        torch.set_num_threads(threads)
        encoder = Encoder(model, max_length=max_length)
        encoder.encode(texts[:16])  # warm up
        return 1000 * statistics.median(one_by_one(encoder, texts))

    from serve_app.router import read_head_config

    head = read_head_config(library.router.checkpoint)
    return ray.get(timed.remote(library.router.model, head.max_length))


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from serve_app.app import build_app
    from serve_app.config import load_library

    with tempfile.TemporaryDirectory() as tmp:
        path = args.library
        if path is None:
            from serve_app.demo.smoke import build_smoke_library

            path = build_smoke_library(Path(tmp) / "smoke")
        library = load_library(path)
        texts = prompts(args.requests)
        floor = encoder_floor(library, texts, args.clients)
        with serving(build_app({"library": str(path)}), include_dashboard=False) as url:
            replicas = int(library.router.autoscaling.get("max_replicas", 1))
            service = asyncio.run(
                served(url, texts, args.clients, args.seconds, replicas, args.warmup)
            )
            floor["p50_ms_in_ray"] = encoder_in_ray(library, texts, floor["threads"])
        # The same decisions offline (tryage route's code): nothing was traded for speed.
        from serve_app.learn.route import decide
        from serve_app.router import LearnedRouter

        router = LearnedRouter(library.router.model, library.router.checkpoint)
        offline = [r["expert"] for r in decide(library, router, [(t, "") for t in texts])]
    chosen = service.pop("chosen")
    overhead = service["p50_ms"] - floor["p50_ms"]
    if "p50_ms_router_threads" in floor:  # the part of the overhead that is the thread count
        service["overhead_vs_router_threads_ms"] = (
            service["p50_ms"] - floor["p50_ms_router_threads"]
        )
    share = service["concurrent"]["decisions_per_s"] / floor["batched_prompts_per_s"]
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "command": " ".join(["python", "-m", "bench.route_latency", *argv]),
        "library": str(args.library or "smoke library"),
        "requests": len(texts),
        "encoder": floor,
        "served": service,
        "overhead_ms": overhead,
        "throughput_share": share,
        "goals": {
            "overhead_ms_at_most": OVERHEAD_GOAL_MS,
            "overhead_met": overhead <= OVERHEAD_GOAL_MS,
            "throughput_share_at_least": SHARE_GOAL,
            "throughput_met": share >= SHARE_GOAL,
        },
        "same_decisions_as_offline": chosen == offline,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results = run(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "route_latency.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    e, s, c = results["encoder"], results["served"], results["served"]["concurrent"]
    batched = e["batched_prompts_per_s"]
    print(
        f"encoder alone:  p50 {e['p50_ms']:.1f} ms, batched {batched:.1f} prompts/s "
        f"({e['threads']} torch threads)"
    )
    if "p50_ms_router_threads" in e:
        print(
            f"                p50 {e['p50_ms_router_threads']:.1f} ms with the router's "
            f"threads: /v1/route is {s['overhead_vs_router_threads_ms']:.1f} ms above that"
        )
    print(
        f"                p50 {e['p50_ms_in_ray']:.1f} ms in a Ray worker with the same threads "
        "(no HTTP, no handle)"
    )
    print(f"/v1/route:      p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms (one client)")
    print(
        f"where it goes:  the router's model in its replica {s['router_model_ms']:.1f} ms a "
        f"prompt ({s['router_threads']} torch threads); proxy + ingress with no model "
        f"(GET /v1/models) {s['http_only_p50_ms']:.1f} ms"
    )
    print(
        f"{c['clients']} clients:   {c['decisions_per_s']:.1f} decisions/s, "
        f"p50 {c['p50_ms']:.0f} ms, {c['failures']} failures, {c['router_replicas']} router "
        f"replica(s) (after {c['warmup_s']:.0f} s of warm-up)"
    )
    if not c["scaled_out"]:
        print("warning: the router did not reach its max_replicas; measured with fewer")
    print(
        f"overhead {results['overhead_ms']:.1f} ms (goal <= {OVERHEAD_GOAL_MS:g}); throughput "
        f"{results['throughput_share']:.0%} of the encoder's (goal >= {SHARE_GOAL:.0%}); "
        f"same decisions as offline: {results['same_decisions_as_offline']}"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
