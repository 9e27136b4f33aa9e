"""Long-tail pool benchmark: a library of many small experts served by one multiplexed pool.

    python -m bench.pool [--experts 200] [--replicas 2] [--slots 16] [--requests 400]
                         [--clients 4] [--out DIR] [--work DIR]

Builds, on this machine and from text every Python has:

1. `--experts` small GPT-2 experts, each a fine-tune of one shared base model on one
   standard-library source file (the long tail of a model hub: many fine-tunes of one base);
2. their profile on held-out chunks of those files (`tryage profile`'s code: the pool's
   experts share the pool's actors, loaded on demand);
3. a router trained on it, predicting every expert's loss (`tryage train`'s code);
4. a library with every expert in one pool (`pool: longtail`) on `--replicas` replicas that
   hold `--slots` experts each, served on a local Ray.

Then measures:

routing     `/v1/route` latency with one client (p50, p99) over held-out prompts
traffic     `--requests` `/v1/infer` calls from `--clients` clients, prompts drawn with Zipf
            popularity over source files (a few experts are popular, most are rare): latency
            p50/p99, distinct experts reached, the pool's hit rate (requests whose expert was
            already loaded in the replica that served them)
cold/warm   for experts no replica holds: the first request (cold: loads the expert) against
            the second (warm), and the load alone as timed in the replica
memory      each replica's resident memory before any expert and with its slots full

Writes OUT/pool.json. The figures in docs/pool.md come from a run with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.route_latency import quantile, timed_routes
from serve_app.session import machine_info, ray_session, serving

ROOT = Path(__file__).resolve().parents[1]
POOL = "longtail"
PROMPT_CHARS = 400
PROMPTS_PER_FILE = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.pool", description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=200, help="experts in the pool (default 200)")
    p.add_argument("--replicas", type=int, default=2, help="pool replicas (default 2)")
    p.add_argument("--slots", type=int, default=16, help="experts a replica holds (default 16)")
    p.add_argument("--requests", type=int, default=400, help="/v1/infer calls (default 400)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--cold", type=int, default=8, help="cold/warm pairs (default 8)")
    p.add_argument("--base-steps", type=int, default=150, help="training steps of the base")
    p.add_argument("--tune-steps", type=int, default=20, help="fine-tuning steps per expert")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output folder")
    p.add_argument("--work", type=Path, help="build folder (default: a temporary one)")
    return p.parse_args(argv)


# --- the library ---------------------------------------------------------------------------


STDLIB = Path(sysconfig.get_paths()["stdlib"])


def source_files(n: int, min_bytes: int = 6000) -> list[Path]:
    """`n` standard-library source files of at least `min_bytes`, in a fixed order."""
    stdlib = STDLIB
    skip = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo")
    files = [
        f
        for f in sorted(stdlib.rglob("*.py"))
        if not set(f.relative_to(stdlib).parts) & set(skip) and f.stat().st_size >= min_bytes
    ]
    if len(files) < n:
        raise SystemExit(f"this Python's standard library has {len(files)} files for {n} experts")
    return files[:n]


def expert_name(i: int) -> str:
    return f"tail-{i:03d}"


def split_file(text: str) -> tuple[str, list[str]]:
    """A file's first 85% (the expert's training text) and chunks of the rest (prompts)."""
    cut = int(len(text) * 0.85)
    held = text[cut:]
    step = max(PROMPT_CHARS, len(held) // PROMPTS_PER_FILE)
    chunks = [held[i : i + PROMPT_CHARS] for i in range(0, len(held), step)]
    return text[:cut], [c for c in chunks if len(c.strip()) > 50][:PROMPTS_PER_FILE]


def build_library(work: Path, files: list[Path], args: argparse.Namespace) -> tuple:
    """Train the base and its fine-tunes, profile them on each file's first held-out chunk,
    train the router; write the library. Returns the library file, the test prompts (each
    file's second held-out chunk, never profiled nor trained on), the expert tuned on each
    test prompt's file, the training report and the training time."""
    import copy

    from tqdm import tqdm

    from serve_app.config import load_library, write_library
    from serve_app.demo.lm import LMConfig, ModelSize, Stream, new_model, train_lm, train_tokenizer
    from serve_app.demo.smoke import laptop_library
    from serve_app.learn.data import Prompt
    from serve_app.learn.profile import ProfileConfig, profile
    from serve_app.learn.train import TrainConfig, train

    texts = [f.read_text(errors="replace") for f in files]
    splits = [split_file(t) for t in texts]
    tokenizer = train_tokenizer([s[0] for s in splits], vocab_size=512)
    cfg = LMConfig(vocab_size=len(tokenizer), block=128, batch_size=8, warmup=0.1)
    size = ModelSize(width=64, layers=2, heads=2)
    streams = [Stream([tokenizer(s[0])["input_ids"]], bos=0) for s in splits]
    base = new_model(size, len(tokenizer), cfg.block, seed=0)
    train_lm(base, streams, steps=args.base_steps, lr=3e-3, cfg=cfg, seed=0, desc="base model")
    experts = []
    for i, (file, stream) in enumerate(tqdm(list(zip(files, streams, strict=True)), "experts")):
        name = expert_name(i)
        model = copy.deepcopy(base)
        train_lm(model, [stream], steps=args.tune_steps, lr=3e-3, cfg=cfg, seed=i, progress=False)
        folder = work / "experts" / name
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        experts.append(
            {
                "name": name,
                "model": f"experts/{name}",
                "task": "text-generation",
                "released": f"2025-{1 + i % 12:02d}-01",
                "description": f"Fine-tune of the pool's base model on {file.name}.",
                "trusted": True,
                "pool": POOL,
            }
        )
    raw = laptop_library(experts, {"num_cpus": 0.5})
    pool = {"min_replicas": args.replicas, "max_replicas": args.replicas}
    raw["pools"] = {
        POOL: {
            "max_models_per_replica": args.slots,
            "resources": {"num_cpus": 0.25},
            "autoscaling": {**pool, "initial_replicas": args.replicas},
        }
    }
    raw["router"]["checkpoint"] = "router"
    path = write_library(work / "library.yaml", raw, "# bench.pool: a long-tail pool library\n")
    train_prompts, test_prompts, origin = [], [], {}
    for i, (file, (_, chunks)) in enumerate(zip(files, splits, strict=True)):
        domain = file.parent.name if file.parent != STDLIB else "stdlib"
        for k, chunk in enumerate(chunks):
            prompt = Prompt.of(chunk, domain)
            (train_prompts if k == 0 else test_prompts).append(prompt)
            origin[prompt.id] = expert_name(i)  # the expert tuned on the prompt's own file
    library = load_library(path, router=False)
    with ray_session(include_dashboard=False):  # tryage profile's code: the pool's actors
        table = profile(
            library.experts,
            train_prompts,
            work / "profile.parquet",
            ProfileConfig(generate=0),
            pools=library.pools,
        ).table
    start = time.perf_counter()
    report = train(library, table, work / "router", TrainConfig(seed=0))
    train_s = time.perf_counter() - start
    return path, test_prompts, origin, report, train_s


# --- serving -------------------------------------------------------------------------------


def zipf_prompts(prompts: list, n: int, seed: int = 0, s: float = 1.1) -> list:
    """`n` prompts drawn with Zipf popularity: rank r (ranks in a seeded random order) weighs
    1 / r^s, so a few prompts (and the experts they route to) are popular, most are rare."""
    rng = random.Random(seed)
    order = list(prompts)
    rng.shuffle(order)
    weights = [1 / (r + 1) ** s for r in range(len(order))]
    return rng.choices(order, weights=weights, k=n)


def replicas_info(app: str, want: int, tries: int = 60) -> dict[str, dict]:
    """Every pool replica's info (calls go to a replica at random: ask until all answered)."""
    from ray import serve

    from serve_app.config import POOL_PREFIX

    handle = serve.get_deployment_handle(POOL_PREFIX + POOL, app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        info = handle.info.remote().result()
        seen[info["replica"]] = info
        if len(seen) >= want:
            break
    return seen


async def traffic(url: str, texts: list[str], clients: int) -> dict[str, Any]:
    """`/v1/infer` for every text from `clients` clients: latencies, experts, failures."""
    import httpx

    latencies: list[float] = []
    experts: list[str] = []
    failures = 0
    queue = list(enumerate(texts))
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def client() -> None:
            nonlocal failures
            while queue:
                _, text = queue.pop(0)
                start = time.perf_counter()
                r = await http.post("/v1/infer", json={"prompt": text, "max_new_tokens": 8})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    experts.append(r.json()["expert"])
                else:
                    failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "requests": len(texts),
        "failures": failures,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * quantile(latencies, 0.99),
        "distinct_experts": len(set(experts)),
        "top_expert_share": max(experts.count(e) for e in set(experts)) / len(experts),
    }


def timed_infer(http: Any, text: str, expert: str) -> float:
    start = time.perf_counter()
    r = http.post("/v1/infer", json={"prompt": text, "experts": [expert], "max_new_tokens": 8})
    r.raise_for_status()
    return time.perf_counter() - start


async def route_latency(url: str, texts: list[str]) -> dict[str, Any]:
    """`/v1/route` one request after another (bench.route_latency's loop)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for t in texts[:10]:  # warm up
            (await http.post("/v1/route", json={"prompt": t})).raise_for_status()
        times, chosen = await timed_routes(http, texts)
    return {
        "p50_ms": 1000 * statistics.median(times),
        "p99_ms": 1000 * quantile(times, 0.99),
        "chosen": chosen,
    }


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import httpx
    import transformers

    from serve_app.app import build_app

    # Prompts longer than an expert's context are scored on what fits; no warning per expert.
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        files = source_files(args.experts)
        start = time.perf_counter()
        path, prompts, origin, report, train_s = build_library(work, files, args)
        build_s = time.perf_counter() - start
        texts = [p.text for p in prompts]
        with serving(
            build_app({"library": str(path)}), name="pool", include_dashboard=False
        ) as url:
            empty = replicas_info("pool", args.replicas)
            with httpx.Client(base_url=url, timeout=120) as http:
                routing = asyncio.run(route_latency(url, texts))
                load = asyncio.run(
                    traffic(
                        url, [p.text for p in zipf_prompts(prompts, args.requests)], args.clients
                    )
                )
                full = replicas_info("pool", args.replicas)
                held = {e for info in full.values() for e in info["experts"]}
                cold_names = [
                    n for n in (expert_name(i) for i in range(args.experts)) if n not in held
                ]
                cold, warm = [], []
                for name in cold_names[: args.cold]:
                    cold.append(timed_infer(http, texts[0], name))
                    warm.append(timed_infer(http, texts[0], name))
            after = replicas_info("pool", args.replicas)
    chosen = routing.pop("chosen")
    # The router's pick against the expert fine-tuned on the prompt's own file.
    own = sum(c == origin[p.id] for c, p in zip(chosen, prompts, strict=True)) / len(prompts)
    requests = sum(i["requests"] for i in full.values()) - sum(
        i["requests"] for i in empty.values()
    )
    misses = sum(i["misses"] for i in full.values()) - sum(i["misses"] for i in empty.values())
    loads = [s for info in after.values() for s in info["load_s"]]
    mb = 1 / 2**20
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "command": " ".join(["python", "-m", "bench.pool", *argv]),
        "experts": args.experts,
        "replicas": args.replicas,
        "slots_per_replica": args.slots,
        "build_s": build_s,
        "router": {
            "train_s": train_s,
            "outputs": len(report.experts),
            "trained_on_prompts": report.n_train + report.n_val,
            "test_prompts": len(prompts),
            "picks_own_file_expert": own,
        },
        "routing": routing,
        "traffic": {
            **load,
            "clients": args.clients,
            "pool_requests": requests,
            "hit_rate": 1 - misses / max(1, requests),
        },
        "cold_vs_warm": {
            "pairs": len(cold),
            "cold_p50_ms": 1000 * statistics.median(cold),
            "warm_p50_ms": 1000 * statistics.median(warm),
            "load_p50_ms": 1000 * statistics.median(loads),
        },
        "memory_mb": {
            rid: {
                "empty": empty.get(rid, {}).get("rss_bytes", 0) * mb,
                "full": info["rss_bytes"] * mb,
                "experts_held": len(info["experts"]),
            }
            for rid, info in after.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results = run(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pool.json").write_text(json.dumps(results, indent=2) + "\n")
    r, t, c = results["routing"], results["traffic"], results["cold_vs_warm"]
    router = results["router"]
    lines = [
        f"{results['experts']} experts on {results['replicas']} replicas x "
        f"{results['slots_per_replica']} slots; built in {results['build_s']:.0f} s",
        f"router: {router['outputs']} outputs, trained in {router['train_s']:.1f} s; picks the "
        f"expert tuned on the prompt's own file for {router['picks_own_file_expert']:.0%}",
        f"/v1/route: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms",
        f"/v1/infer x{t['requests']} ({t['clients']} clients, Zipf): p50 {t['p50_ms']:.0f} ms, "
        f"p99 {t['p99_ms']:.0f} ms, {t['requests_per_s']:.1f} req/s, {t['failures']} failures, "
        f"{t['distinct_experts']} experts, hit rate {t['hit_rate']:.0%}",
        f"cold request p50 {c['cold_p50_ms']:.0f} ms, warm {c['warm_p50_ms']:.0f} ms; "
        f"the load alone {c['load_p50_ms']:.0f} ms",
    ]
    for rid, m in results["memory_mb"].items():
        lines.append(
            f"replica {rid}: {m['empty']:.0f} MB before any expert, {m['full']:.0f} MB "
            f"holding {m['experts_held']}"
        )
    print("\n".join(lines))
    return 0 if t["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
