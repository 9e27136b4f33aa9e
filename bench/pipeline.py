"""Pipeline benchmark: how fast profile, train and evaluate run on a library.

    python -m bench.pipeline [--library FILE] [--data PATH] [--per-domain N] [--out DIR]

Copies the library (a fresh smoke library when none is given) to a temporary folder, then
times each stage as the command line runs it, in one local Ray:

    profile   every expert on the training sample (--per-domain N, seed 0), scoring only;
              rows/s per expert come from the profile's own `seconds` column
    train     the router head on that profile, frozen encoder (embedding included)
    evaluate  a held-out sample (seed 1, prompts trained on left out): truth profile, router
              and every baseline

Data: `../shared/corpora` when it is beside the checkout, else the standard-library corpus
(`serve_app.learn.data.stdlib_prompts`). Prints a table and writes `OUT/pipeline.json` with the
machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from serve_app.session import machine_info

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--library", type=Path, help="library.yaml (default: a fresh smoke library)")
    p.add_argument("--data", type=Path, help="data path (default: ../shared/corpora)")
    p.add_argument("--per-domain", type=int, default=10, help="training prompts per domain")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output folder")
    return p.parse_args(argv)


def _data(args: argparse.Namespace, tmp: Path) -> Path:
    """The data path: --data, else ../shared/corpora, else the standard-library corpus."""
    from serve_app.learn.data import SHARED_CORPORA, stdlib_prompts

    if args.data:
        return args.data
    if SHARED_CORPORA.is_dir():
        return SHARED_CORPORA
    root = tmp / "data"
    for p in stdlib_prompts():
        (root / p.domain).mkdir(parents=True, exist_ok=True)
        with (root / p.domain / "prompts.jsonl").open("a") as f:
            f.write(json.dumps({"text": p.text}) + "\n")
    return root


def run(args: argparse.Namespace) -> dict:
    from serve_app.session import ray_session

    tmp = Path(tempfile.mkdtemp(prefix="tryage-bench-"))
    try:
        with ray_session(address="local", include_dashboard=False):
            return _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: argparse.Namespace, tmp: Path) -> dict:
    """Profile, train and evaluate in `tmp`; the figures."""
    from serve_app.config import load_library
    from serve_app.demo.smoke import build_smoke_library
    from serve_app.learn.data import load_prompts
    from serve_app.learn.evaluate import evaluate, held_out, measure_truth
    from serve_app.learn.profile import ProfileConfig, profile
    from serve_app.learn.train import TrainConfig, train

    if args.library:
        shutil.copytree(args.library.parent, tmp / "lib")
        lib = tmp / "lib" / args.library.name
    else:
        lib = build_smoke_library(tmp / "lib")
    data = _data(args, tmp)
    library = load_library(lib)
    train_prompts = load_prompts(data, per_domain=args.per_domain, seed=0)
    figures: dict = {"prompts": len(train_prompts), "experts": library.names}

    start = time.perf_counter()
    table = profile(
        library.experts, train_prompts, tmp / "profile.parquet", ProfileConfig(generate=0)
    ).table
    figures["profile_s"] = time.perf_counter() - start
    seconds = {}
    for row in table.select(["expert", "seconds"]).to_pylist():
        seconds[row["expert"]] = seconds.get(row["expert"], 0.0) + row["seconds"]
    figures["rows_per_s"] = {e: len(train_prompts) / s for e, s in seconds.items()}

    start = time.perf_counter()
    train(library, table, tmp / "lib" / "router", TrainConfig(mode="frozen"))
    figures["train_s"] = time.perf_counter() - start

    library = load_library(lib)
    prompts = held_out(library, load_prompts(data, per_domain=args.per_domain, seed=1))
    start = time.perf_counter()
    # folder=tmp: nothing of the library's own profiles is reused, so every row is measured.
    truth = measure_truth(library, prompts, tmp / "eval.parquet", folder=tmp, progress=False).table
    result, _, _ = evaluate(library, truth)
    figures["evaluate_s"] = time.perf_counter() - start
    figures["evaluate_prompts"] = result.n
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "per_domain": args.per_domain,
        **figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| stage | seconds | notes |\n|---|---|---|")
    print(
        f"| profile | {figures['profile_s']:.1f} | {figures['prompts']} prompts x "
        f"{len(figures['experts'])} experts |"
    )
    print(f"| train | {figures['train_s']:.1f} | frozen encoder, embeddings included |")
    print(
        f"| evaluate | {figures['evaluate_s']:.1f} | {figures['evaluate_prompts']} held-out "
        "prompts, truth profile included |"
    )
    print(
        "\nscoring rows/s per expert (one actor each): "
        + ", ".join(f"{e} {r:.1f}" for e, r in figures["rows_per_s"].items())
    )
    print(f"wrote {args.out / 'pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
