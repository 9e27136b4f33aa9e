"""The `tryage` command line. Every command is a function; `main(argv)` dispatches."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from serve_app.config import LibraryError
from serve_app.learn.data import DataError


def cmd_smoke_library(args: argparse.Namespace) -> int:
    from serve_app.demo.smoke import build_smoke_library

    path = build_smoke_library(args.out, gpus=args.gpus, seed=args.seed)
    print(f"wrote {path}")
    return 0


def cmd_demo_build(args: argparse.Namespace) -> int:
    """Build the demo library (resumable: finished steps are skipped) and print its summary."""
    import dataclasses

    from serve_app.demo.build import PRESETS, build_demo

    cfg = dataclasses.replace(PRESETS[args.preset], seed=args.seed)
    result = build_demo(args.out, args.corpus, cfg, progress=not args.quiet)
    print(result.table())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a library on a local Ray instance (or RAY_ADDRESS's cluster) until Ctrl-C."""
    import ray

    from serve_app.app import DEFAULT_LIBRARY, build_graph
    from serve_app.config import load_library
    from serve_app.session import serving

    if not args.library.exists():
        if args.library != DEFAULT_LIBRARY:
            raise LibraryError(f"no library at {args.library}")
        raise LibraryError(
            f"no library at {args.library}; build the demo library (tryage demo build, or "
            "make serve) or pass --library FILE"
        )
    library = load_library(args.library)  # validate before starting Ray
    app = build_graph(library)
    # Ctrl-C and SIGTERM stop cleanly, even where a shell started us with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        init = {"log_to_driver": True}
        if args.metrics_port:
            if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
                print(
                    "tryage: --metrics-port applies to the local Ray this command starts; on a "
                    "cluster, start Ray with `ray start --metrics-export-port N`",
                    file=sys.stderr,
                )
            init["_metrics_export_port"] = args.metrics_port

        def warn() -> None:  # before the app starts: a router that cannot be placed waits
            if warning := library.short_of(ray.cluster_resources()):
                print(f"tryage: warning: {warning}", file=sys.stderr, flush=True)

        with serving(app, host=args.host, port=args.port, on_start=warn, **init) as url:
            print(f"tryage: serving {args.library} on {url} (Ctrl-C stops)", flush=True)
            if args.metrics_port:
                print(
                    f"tryage: Prometheus metrics on http://127.0.0.1:{args.metrics_port}/metrics",
                    flush=True,
                )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:  # said before Serve and Ray log their shutdown
                print("tryage: stopping", flush=True)
    except KeyboardInterrupt:  # while starting
        print("tryage: stopping", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _prompts(args: argparse.Namespace) -> list:
    from serve_app.learn.data import load_prompts

    prompts = load_prompts(args.data, per_domain=args.per_domain, seed=args.seed)
    if not prompts:
        raise LibraryError(f"no prompts in {args.data}")
    return prompts


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure every expert on every prompt; write the profile table (nothing else)."""
    from serve_app.config import load_library
    from serve_app.learn.profile import ProfileConfig, measures, profile

    library = load_library(args.library, router=False)
    prompts = _prompts(args)
    cfg = ProfileConfig(
        generate=args.generate,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        actors_per_expert=args.actors_per_expert,
    )
    print(f"profiling {len(library.experts)} experts on {len(prompts)} prompts", file=sys.stderr)
    run = profile(library.experts, prompts, args.out, cfg, pools=library.pools)
    print(
        f"wrote {args.out}: {run.table.num_rows} rows "
        f"({run.measured} measured now, {run.reused} reused)"
    )
    for name, m in measures(run.table).items():
        if m["verbosity"] is not None:
            read = "-" if m["readability"] is None else f"{m['readability']:.1f}"
            print(f"  {name}: verbosity {m['verbosity']:.1f} bytes, readability {read}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the router on a profile; write the checkpoint folder the library points at."""
    import torch

    from serve_app.config import load_library
    from serve_app.learn.profile import read_profile
    from serve_app.learn.train import TrainConfig, train

    library = load_library(args.library, router=False)
    mode = args.mode
    if mode == "auto":
        mode = "finetune" if torch.cuda.is_available() else "frozen"
    out = args.out or library.router.checkpoint
    cfg = TrainConfig(
        mode=mode,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_epochs=args.max_epochs,
        patience=args.patience,
        mix_folds=args.mix_folds,
    )
    cache = args.profile.with_name(args.profile.name + ".embeddings")
    report = train(library, read_profile(args.profile), out, cfg, cache=cache)
    print(report.table())
    print(f"wrote {out} (head, reference, measures, report.json)")
    return 0


def _truth(args: argparse.Namespace, library):
    """The data's prompts (held out from the router's training unless asked) profiled on
    every expert, cached next to the library."""
    from serve_app.learn.evaluate import held_out, measure_truth, stderr

    if args.data is None:  # the truth is a profile already there (imported scores)
        return _profile_truth(args, library)
    prompts = _prompts(args)
    if not args.include_trained:
        prompts = held_out(library, prompts, log=stderr, data=args.data)
    return measure_truth(
        library,
        prompts,
        args.profile,
        folder=args.library.resolve().parent,
        progress=not args.quiet,
        log=stderr,
    ).table


def _profile_truth(args: argparse.Namespace, library):
    """The truth from --profile alone, less the prompts the router was trained on."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from serve_app.learn.matrix import trained_ids
    from serve_app.learn.profile import read_profile

    if args.profile is None or not args.profile.is_file():
        raise LibraryError("pass --data PATH, or --profile FILE of a profile already measured")
    table = read_profile(args.profile)
    if not args.include_trained:
        seen = pa.array(sorted(trained_ids(library.router.checkpoint)), pa.string())
        table = table.filter(pc.invert(pc.is_in(table["prompt_id"], seen)))
        if table.num_rows == 0:
            raise LibraryError(
                f"every prompt in {args.profile} was used to train the router: pass a "
                "profile it did not train on (import held-out scores with tryage scores "
                "import), or --include-trained to judge it on its training prompts anyway"
            )
    return table


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Route every prompt with the router and the baselines; report against the truth."""
    import json

    from serve_app.config import load_library
    from serve_app.learn.evaluate import evaluate

    library = load_library(args.library)
    table = _truth(args, library)
    result, _, _ = evaluate(library, table, task=args.task, k=args.k)
    print(json.dumps(result.as_json(), indent=2) if args.json else result.table())
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    """Sweep one weight; write pareto.csv and pareto.png and print what each value trades."""
    from serve_app.config import load_library
    from serve_app.learn.pareto import check_weight, run_pareto

    check_weight(args.weight)
    library = load_library(args.library)
    table = _truth(args, library)
    result = run_pareto(library, table, args.weight, args.out, args.values, args.task, args.k)
    print("\n".join(result.lines))
    print(f"non-dominated: {', '.join(p.label for p in result.points if p.pareto)}")
    print(f"wrote {args.out / 'pareto.csv'} and {args.out / 'pareto.png'}")
    return 0


def cmd_scores_import(args: argparse.Namespace) -> int:
    """Turn scores measured elsewhere into a profile and a routing library."""
    from serve_app.learn.scores import import_scores

    result = import_scores(
        args.format,
        args.paths,
        args.out,
        base_url=args.base_url,
        lower_is_better=args.lower_is_better,
    )
    print(result.table())
    print(
        f"next: tryage train --library {result.library} --profile {result.profile}",
        file=sys.stderr,
    )
    return 0


def _weights(items: list[str] | None) -> dict[str, float] | None:
    """NAME=VALUE pairs of --weight."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise LibraryError(f"--weight {item!r}: expected NAME=NUMBER, such as size=0.5")
    return out


def cmd_route(args: argparse.Namespace) -> int:
    """Route every row of a data path offline, as the service would; write JSONL."""
    from serve_app.config import load_library
    from serve_app.errors import TryageError
    from serve_app.learn.route import route_data

    library = load_library(args.library)
    try:
        routed = route_data(
            library,
            args.data,
            args.out,
            batch_size=args.batch_size,
            weights=_weights(args.weight),
            allow=args.experts.split(",") if args.experts else None,
            task=args.task,
        )
    except TryageError as err:
        raise LibraryError(str(err)) from None
    chosen = ", ".join(f"{e} {n}" for e, n in sorted(routed.chosen.items(), key=lambda x: -x[1]))
    print(
        f"routed {routed.rows} rows ({routed.errors} refused) in {routed.seconds:.1f} s, "
        f"{routed.ms_per_prompt:.2f} ms a prompt; chosen: {chosen}"
    )
    print(f"wrote {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    from serve_app.app import DEFAULT_LIBRARY
    from serve_app.learn.profile import ProfileConfig
    from serve_app.learn.train import TrainConfig

    pcfg, tcfg = ProfileConfig(), TrainConfig()

    p = argparse.ArgumentParser(prog="tryage", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("smoke-library", help="write a tiny random library to OUT/library.yaml")
    s.add_argument("out", type=Path)
    s.add_argument("--gpus", action="store_true", help="router and experts ask for one GPU each")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_smoke_library)

    s = sub.add_parser("demo", help="the offline demo library")
    demo = s.add_subparsers(dest="demo_command", required=True)
    s = demo.add_parser(
        "build",
        help="build the demo library offline: corpora, experts, profile, router (resumable)",
    )
    s.add_argument(
        "--corpus",
        type=Path,
        help="a folder of DOMAIN/*.jsonl (like ../shared/corpora); default: a harvest of text "
        "this machine already has (Python's source, docs and installed packages' licences and "
        "READMEs)",
    )
    s.add_argument("--out", type=Path, default=DEFAULT_LIBRARY.parent)
    s.add_argument(
        "--preset", choices=("default", "tiny"), default="default", help="tiny: seconds, for tests"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo_build)

    s = sub.add_parser("serve", help="serve a library with Ray Serve (blocks; Ctrl-C stops)")
    s.add_argument("--library", type=Path, default=DEFAULT_LIBRARY)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--metrics-port",
        type=int,
        help="also expose Ray's Prometheus metrics (tryage's and Serve's) on 127.0.0.1:N/metrics",
    )
    s.set_defaults(func=cmd_serve)

    def data_args(s: argparse.ArgumentParser, data_required: bool = True) -> None:
        s.add_argument("--library", type=Path, required=True, help="library.yaml")
        s.add_argument(
            "--data", type=Path, required=data_required, help=".jsonl/.parquet file or folder"
        )
        s.add_argument("--per-domain", type=int, help="a seeded sample of N prompts per domain")
        s.add_argument("--seed", type=int, default=0)

    def truth_args(s: argparse.ArgumentParser) -> None:
        data_args(s, data_required=False)
        s.add_argument(
            "--profile",
            type=Path,
            help="where the data's true losses are cached; without --data, a profile already "
            "measured (such as imported scores) is the truth",
        )
        s.add_argument("--k", type=int, default=10, help="neighbours of the knn baseline")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.add_argument(
            "--include-trained",
            action="store_true",
            help="keep prompts the router was trained on (left out by default)",
        )
        s.add_argument(
            "--task",
            choices=("text-generation", "fill-mask"),
            help="only experts of this task compete (default: all; text-generation for "
            "verbosity and readability sweeps)",
        )

    s = sub.add_parser("profile", help="measure every expert on every prompt (a Ray job)")
    data_args(s)
    s.add_argument("--out", type=Path, required=True, help="the profile table (.parquet)")
    s.add_argument(
        "--generate", type=int, default=pcfg.generate, help="prompts sampled for generation"
    )
    s.add_argument(
        "--new-tokens", type=int, default=pcfg.new_tokens, help="tokens generated per sample"
    )
    s.add_argument("--batch-size", type=int, default=pcfg.batch_size)
    s.add_argument("--actors-per-expert", type=int, default=pcfg.actors_per_expert)
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("train", help="train the router on a profile (writes its checkpoint)")
    s.add_argument("--library", type=Path, required=True)
    s.add_argument("--profile", type=Path, required=True)
    s.add_argument("--out", type=Path, help="checkpoint folder (default: the library's)")
    s.add_argument(
        "--mode",
        choices=("auto", "frozen", "finetune"),
        default="auto",
        help="frozen: head only on cached embeddings; finetune: encoder too (accelerate); "
        "auto: finetune where torch sees a GPU, else frozen",
    )
    s.add_argument("--val-fraction", type=float, default=tcfg.val_fraction)
    s.add_argument("--seed", type=int, default=tcfg.seed)
    s.add_argument("--max-epochs", type=int, default=tcfg.max_epochs)
    s.add_argument("--patience", type=int, default=tcfg.patience)
    s.add_argument(
        "--mix-folds",
        type=int,
        default=tcfg.mix_folds,
        help="frozen mode: choose the mix on out-of-fold predictions over this many folds of "
        "every prompt (at least 20 prompts a fold); 0: on the validation prompts",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="the router against the baselines on a data path")
    truth_args(s)
    s.add_argument("--json", action="store_true", help="print the contract's JSON")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("pareto", help="sweep one weight; write pareto.csv and pareto.png")
    truth_args(s)
    s.add_argument("--weight", required=True, help="size, recency, security, ...")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--values", type=float, nargs="+", help="weight values to sweep")
    s.set_defaults(func=cmd_pareto)

    s = sub.add_parser("scores", help="per-prompt scores measured elsewhere")
    scores = s.add_subparsers(dest="scores_command", required=True)
    s = scores.add_parser(
        "import",
        help="scores of models measured elsewhere -> OUT/profile.parquet and OUT/library.yaml",
    )
    s.add_argument("paths", type=Path, nargs="+", help="the files to import")
    s.add_argument("--format", required=True, choices=("routerdc", "routerbench", "jsonl"))
    s.add_argument("--out", type=Path, required=True)
    s.add_argument(
        "--base-url",
        default="http://127.0.0.1:8001/v1",
        help="where the imported models will be served (each expert's base_url; edit later)",
    )
    s.add_argument(
        "--lower-is-better",
        action="store_true",
        help="jsonl: the numbers are losses (lower is better), not scores",
    )
    s.set_defaults(func=cmd_scores_import)

    s = sub.add_parser("route", help="route every row of a data path offline; write JSONL")
    s.add_argument("--library", type=Path, required=True, help="library.yaml")
    s.add_argument("--data", type=Path, required=True, help=".jsonl/.parquet file or folder")
    s.add_argument("--out", type=Path, required=True, help="the decisions (.jsonl)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument(
        "--weight", action="append", metavar="NAME=VALUE", help="an objective weight (repeatable)"
    )
    s.add_argument("--experts", help="comma-separated allow-list")
    s.add_argument("--task", choices=("text-generation", "fill-mask"))
    s.set_defaults(func=cmd_route)
    return p


def _no_library_progress_bars() -> None:
    """--quiet: no bars from the libraries either (transformers draws one as it loads a model's
    weights; huggingface_hub's downloads draw theirs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tryage` console script."""
    args = parser().parse_args(argv)
    if getattr(args, "quiet", False):
        _no_library_progress_bars()
    try:
        return args.func(args)
    except (LibraryError, DataError) as err:
        print(f"tryage: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
