"""Routing benchmark: the demo library's router against the baselines on held-out documents.

    python -m bench.routing [--corpus DIR] [--out DIR] [--preset default|tiny]
                            [--per-domain N] [--docs DIR] [--results FILE] [--quiet]

1. build    the demo library from the corpus into OUT (`tryage demo build`'s code; resumable:
            a rerun skips finished steps), timed per step
2. evaluate what `tryage evaluate --json` reports (serve_app.learn.evaluate, the same code) on
            OUT/data/heldout, documents neither the experts nor the router were trained on,
            N per domain (seed 0)
3. pareto   what `tryage pareto --weight size` draws, on the same prompts (one truth profile)

Writes RESULTS (default bench/results/routing.json), DOCS/routing-benchmark.md, and the Pareto
plot and table DOCS/routing-pareto-size.png and .csv; prints the overall table. `render` makes
the page from the results alone.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from serve_app.session import machine_info

ROOT = Path(__file__).resolve().parents[1]
PAGE = "routing-benchmark.md"
PNG, CSV = "routing-pareto-size.png", "routing-pareto-size.csv"
#: "Well above": the router's top-1 beats every baseline but the oracle by this much at least.
TOP1_MARGIN = 0.05
#: The router's regret is at most this share of best_single's.
REGRET_SHARE = 0.25
#: What each method is, for the page (serve_app.learn.evaluate's definitions).
METHODS = {
    "router": "the trained router: the expert with the lowest predicted loss",
    "oracle": "the expert with the lowest true loss (the ceiling: top-1 1, regret 0)",
    "random": "a uniformly random expert, in expectation",
    "best_single": "the one expert with the lowest mean loss on the router's training profile",
    "model_card": "the expert whose description is most similar to the prompt",
    "knn": "the lowest mean loss over the 10 training prompts nearest the prompt",
}


class BenchError(Exception):
    """A benchmark that cannot run; the message says what to change."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.routing", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, help="DOMAIN/*.jsonl folder (default ../shared/corpora)")
    p.add_argument("--out", type=Path, default=ROOT / "libraries" / "corpora", help="library")
    p.add_argument("--preset", choices=("default", "tiny"), default="default")
    p.add_argument("--per-domain", type=int, default=60, help="held-out prompts per domain")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="folder of the page")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _shown(path: Path) -> str:
    """A path relative to the checkout when it is inside it or beside it (../shared)."""
    path = path.resolve()
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT.parent) else str(path)


def _build_seconds(seconds: dict[str, float], previous: dict | None) -> dict[str, Any]:
    """This run's step times; a step skipped now (0 s) keeps an earlier run's time, if any."""
    earlier = (previous or {}).get("build", {}).get("seconds", {})
    kept = {
        step: earlier[step] for step, s in seconds.items() if s == 0 and earlier.get(step, 0) > 0
    }
    return {
        "seconds": {step: kept.get(step, s) for step, s in seconds.items()},
        "this_run_s": sum(seconds.values()),
        "from_earlier_run": sorted(kept),
    }


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Build, evaluate and sweep; the results dict that `render` turns into the page."""
    from serve_app.learn.data import SHARED_CORPORA

    corpus = (args.corpus or SHARED_CORPORA).resolve()
    if not corpus.is_dir():
        raise BenchError(
            f"no corpus folder at {corpus}; pass --corpus DIR, a folder of DOMAIN/*.jsonl "
            "(the shape of ../shared/corpora)"
        )
    if args.per_domain < 1:
        raise BenchError("--per-domain must be at least 1")
    out = args.out.resolve()
    previous = None
    if args.results.exists():
        previous = json.loads(args.results.read_text())
        same = (previous.get("library"), previous.get("preset"), previous.get("corpus"))
        if same != (_shown(out / "library.yaml"), args.preset, _shown(corpus)):
            previous = None

    from serve_app.config import load_library
    from serve_app.demo.build import PRESETS, build_demo
    from serve_app.learn.data import load_prompts
    from serve_app.learn.evaluate import evaluate, held_out, measure_truth, stderr
    from serve_app.learn.pareto import run_pareto
    from serve_app.session import ray_session

    # One Ray for the build's profile, evaluate and pareto.
    with ray_session(include_dashboard=False):
        start = time.perf_counter()
        built = build_demo(out, corpus, PRESETS[args.preset], progress=not args.quiet)
        build_s = time.perf_counter() - start

        library = load_library(out / "library.yaml")
        prompts = load_prompts(out / "data" / "heldout", per_domain=args.per_domain, seed=0)
        prompts = held_out(library, prompts, log=stderr)
        start = time.perf_counter()
        run = measure_truth(library, prompts, folder=out, progress=not args.quiet, log=stderr)
        table = run.table
        evaluation = evaluate(library, table)[0].as_json()
        evaluate_s = time.perf_counter() - start

        sweep_dir = out / "pareto-size"
        start = time.perf_counter()
        pareto = run_pareto(library, table, "size", sweep_dir)
        pareto_s = time.perf_counter() - start

    args.docs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sweep_dir / "pareto.png", args.docs / PNG)
    shutil.copyfile(sweep_dir / "pareto.csv", args.docs / CSV)
    with (sweep_dir / "pareto.csv").open() as f:
        front = non_dominated(list(csv.DictReader(f)))
    summary = json.loads((out / "summary.json").read_text())
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": shlex.join(["python", "-m", "bench.routing", *argv]),
        "corpus": _shown(corpus),
        "preset": args.preset,
        "library": _shown(out / "library.yaml"),
        "per_domain": args.per_domain,
        "domains": summary["domains"],
        "split": summary["split"],
        "build": {**_build_seconds(built.seconds, previous), "wall_s": build_s},
        "evaluate_s": evaluate_s,
        "truth_rows": {"measured": run.measured, "reused": run.reused},
        "pareto_s": pareto_s,
        "evaluate": evaluation,
        "goal": goal(evaluation),
        "pareto": {
            "weight": "size",
            "calibration": pareto.lines,
            "non_dominated": front,
            "png": PNG,
            "csv": CSV,
        },
        "experts": [
            {k: e[k] for k in ("name", "domain", "params", "released")} for e in summary["experts"]
        ],
        "heldout_bpb": summary["heldout_bpb"],
        "router_validation": summary["router_validation"],
        "grouped": summary.get("router_grouped"),
    }


def non_dominated(rows: list[dict[str, str]]) -> list[str]:
    """The labels of pareto.csv's non-dominated points; consecutive weight values with the same
    outcome as one range ("size=0.15-10")."""
    runs: list[list[dict[str, str]]] = []
    previous: dict[str, str] | None = None
    for row in rows:
        if row["pareto"] == "True":
            same = previous is not None and previous["pareto"] == "True" and row["kind"] == "router"
            same = same and all(
                row[k] == previous[k] for k in ("kind", "mean_loss", "mean_penalty")
            )
            if same:
                runs[-1].append(row)
            else:
                runs.append([row])
        previous = row
    return [
        run[0]["label"] if len(run) == 1 else f"{run[0]['label']}-{float(run[-1]['weight']):g}"
        for run in runs
    ]


# --- the page -------------------------------------------------------------------------------


def goal(evaluation: dict) -> dict[str, Any]:
    """Whether the router meets the goal: top-1 at least TOP1_MARGIN above every baseline but
    the oracle, and regret at most REGRET_SHARE of best_single's."""
    router, baselines = evaluation["router"], evaluation["baselines"]
    rivals = {name: m["top1"] for name, m in baselines.items() if name != "oracle"}
    closest = max(rivals, key=rivals.get)
    margin = router["top1"] - rivals[closest]
    single = baselines["best_single"]["regret"]
    limit = REGRET_SHARE * single
    top1_met = margin >= TOP1_MARGIN
    regret_met = router["regret"] <= limit
    return {
        "met": top1_met and regret_met,
        "top1_met": top1_met,
        "top1_margin": margin,
        "closest_baseline": closest,
        "regret_met": regret_met,
        "regret_share_of_best_single": router["regret"] / single if single > 0 else None,
    }


def _methods(evaluation: dict) -> dict[str, dict[str, float]]:
    return {"router": evaluation["router"], **evaluation["baselines"]}


def overall_table(evaluation: dict) -> str:
    """Router and every baseline: top-1, regret and mean true loss, as Markdown."""
    lines = [
        "| method | top-1 | regret (bits/byte) | mean loss (bits/byte) |",
        "|---|---:|---:|---:|",
    ]
    for name, m in _methods(evaluation).items():
        shown = f"**{name}**" if name == "router" else name
        lines.append(f"| {shown} | {m['top1']:.3f} | {m['regret']:.4f} | {m['mean_loss']:.4f} |")
    return "\n".join(lines)


def per_domain_table(evaluation: dict, metric: str, fmt: str) -> str:
    """One metric per domain for the router and the baselines (the oracle left out: it is
    top-1 1 and regret 0 everywhere); the best method but the oracle in bold."""
    names = [n for n in _methods(evaluation) if n != "oracle"]
    lower_better = metric != "top1"
    lines = [
        "| domain | n | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for domain, row in evaluation["per_domain"].items():
        values = [row[f"{n}_{metric}"] for n in names]
        best = min(values) if lower_better else max(values)
        cells = [f"**{v:{fmt}}**" if v == best else f"{v:{fmt}}" for v in values]
        lines.append(f"| {domain} | {int(row['n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _losses_table(results: dict) -> str:
    domains = results["domains"]
    losses = results["heldout_bpb"]
    best = {d: min(losses, key=lambda e: losses[e][d]) for d in domains}
    lines = [
        "| expert | params | " + " | ".join(domains) + " |",
        "|---|---:|" + "---:|" * len(domains),
    ]
    for e in results["experts"]:
        cells = [
            f"**{losses[e['name']][d]:.3f}**"
            if best[d] == e["name"]
            else f"{losses[e['name']][d]:.3f}"
            for d in domains
        ]
        lines.append(f"| {e['name']} | {e['params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_table(results: dict) -> str:
    split = results["split"]
    names = [s for s in ("lm", "router", "heldout") if s in split]
    lines = ["| domain | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for d in results["domains"]:
        lines.append(f"| {d} | " + " | ".join(str(split[s].get(d, 0)) for s in names) + " |")
    totals = [str(sum(split[s].values())) for s in names]
    lines.append("| all | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def _build_table(build: dict) -> str:
    earlier = set(build.get("from_earlier_run", []))
    lines = ["| step | seconds |", "|---|---:|"]
    for step, s in build["seconds"].items():
        note = " (an earlier run)" if step in earlier else " (skipped)" if s == 0 else ""
        lines.append(f"| {step} | {s:.1f}{note} |")
    lines.append(f"| all | {sum(build['seconds'].values()):.1f} |")
    return "\n".join(lines)


GROUPED_METHODS = ("router", "knn", "best_single", "random", "oracle")


def grouped_table(grouped: dict) -> str:
    """Top-1 and regret on sources the router never trained on, overall and per domain."""
    overall = grouped["overall"]
    lines = [
        "| method | top-1 | regret (bits/byte) |",
        "|---|---:|---:|",
    ]
    for name in GROUPED_METHODS:
        m = overall[name]
        shown = f"**{name}**" if name == "router" else name
        lines.append(f"| {shown} | {m['top1']:.3f} | {m['regret']:.4f} |")
    rivals = ("router", "knn", "best_single")
    lines += [
        "",
        "| domain | n | "
        + " | ".join(f"{r} top-1" for r in rivals)
        + " | "
        + " | ".join(f"{r} regret" for r in rivals)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(rivals)),
    ]
    for domain, figures in grouped["per_domain"].items():
        n = figures["oracle"]["scored"]
        top1 = " | ".join(f"{figures[r]['top1']:.3f}" for r in rivals)
        regret = " | ".join(f"{figures[r]['regret']:.4f}" for r in rivals)
        lines.append(f"| {domain} | {n} | {top1} | {regret} |")
    return "\n".join(lines)


def goal_line(evaluation: dict) -> str:
    """The goal and whether the figures meet it, in one sentence."""
    g = goal(evaluation)
    router, single = evaluation["router"], evaluation["baselines"]["best_single"]
    share = g["regret_share_of_best_single"]
    share_text = "n/a (best_single's regret is 0)" if share is None else f"{share:.0%}"
    return (
        f"**Goal:** router top-1 well above every baseline (at least {TOP1_MARGIN:.2f} above "
        f"each, the oracle excepted); regret at most a quarter of best_single's. "
        f"**{'Met' if g['met'] else 'Not met'}.** "
        f"Top-1: {router['top1']:.3f}, {g['top1_margin']:+.3f} over the closest baseline "
        f"({g['closest_baseline']}) — {'met' if g['top1_met'] else 'not met'}. "
        f"Regret: {router['regret']:.4f} bits/byte, {share_text} of best_single's "
        f"{single['regret']:.4f} — {'met' if g['regret_met'] else 'not met'}."
    )


def _truth_said(rows: dict | None) -> str:
    """How the run came by the true losses it evaluates on (rows measured now or reused)."""
    if rows is None:  # results written before runs recorded it
        return "whether the true losses were measured now or read back was not recorded"
    if not rows["reused"]:
        return "every expert run on every prompt included"
    if not rows["measured"]:
        return "the true losses read from earlier profiles with the same expert weights"
    total = rows["measured"] + rows["reused"]
    return (
        f"{rows['measured']} of {total} true losses measured now, the rest read from earlier "
        "profiles with the same expert weights"
    )


def render(results: dict) -> str:
    """The benchmark's Markdown page, from the results dict alone."""
    ev, m = results["evaluate"], results["machine"]
    split = results["split"]
    p = results["pareto"]
    truth = _truth_said(results.get("truth_rows"))
    methods = "\n".join(f"- `{name}`: {what}" for name, what in METHODS.items())
    build = results["build"]
    carried = (
        " Steps marked *an earlier run* were skipped by this run (resumed) and show the time of "
        "the run that did them."
        if build.get("from_earlier_run")
        else ""
    )
    parts = [
        "# Routing benchmark: the router against the baselines on held-out documents",
        f"Run {results['date']} on {m['platform']}, {m['cpus']} CPUs, device {m['device']}, "
        f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']} (load average "
        f"{m['load_average_1m']:.1f} at the end: timings depend on what else ran).",
        "## How it was made",
        f"```bash\n{results['command']}\n```",
        f"The demo library (`--preset {results['preset']}`) built from `{results['corpus']}` "
        f"({len(results['domains'])} domains) into `{results['library']}`: each domain's "
        "documents split by a hash of their text into `lm` (trains the experts), `router` "
        "(profiled to train the router) and `heldout` (never trained on). Then "
        f"`tryage evaluate --json` and `tryage pareto --weight size` on the held-out split, up "
        f"to {results['per_domain']} documents per domain (seed 0): {ev['n']} prompts, "
        f"{len(ev['experts'])} experts. Every figure is the true loss (bits per byte) of the "
        "expert a method chooses, measured by running every expert on every prompt.",
        f"Documents per split ({sum(split.get('heldout', {}).values())} held out):",
        _split_table(results),
        f"Build time per step, seconds.{carried}",
        _build_table(build),
        f"Evaluate {results['evaluate_s']:.0f} s ({truth}), pareto {results['pareto_s']:.0f} s "
        "(the same truth profile, read back).",
        "## Overall",
        overall_table(ev),
        "`top-1`: share of prompts where the method chose the expert with the lowest true "
        "loss. `regret`: mean true loss of the chosen expert minus the lowest. Methods:",
        methods,
        goal_line(ev),
        "## On sources the router never saw",
        *(
            [
                f"The held-out documents above come from the same sources as the router's "
                f"training prompts. Here the router's profile ({results['grouped']['n']} "
                f"prompts) is cut into {results['grouped']['folds']} folds of whole sources "
                f"({results['grouped']['groups']} groups: a corpus file, or a folder of one "
                "such as a programming language or a patent format); each fold is routed by a "
                "router trained, validated and tuned on the other folds only, beside kNN and "
                "the best single expert fitted on the same folds (`serve_app.learn.grouped`). "
                "A domain with one source is then a domain the router never saw.",
                grouped_table(results["grouped"]),
                *(
                    [
                        "New sources of domains the router knows: within every domain with "
                        "two or more groups, its groups held out in turn (the router trained on "
                        "the domain's other sources; its validation holds out sources the same "
                        "way); domains of one source always train:",
                        grouped_table(results["grouped"]["within_domains"]),
                    ]
                    if results["grouped"].get("within_domains")
                    else []
                ),
            ]
            if results.get("grouped")
            else ["(not measured in this run)"]
        ),
        "## Per domain",
        "Top-1 (higher is better; the best method but the oracle in bold):",
        per_domain_table(ev, "top1", ".3f"),
        "Regret, bits per byte (lower is better):",
        per_domain_table(ev, "regret", ".4f"),
        "## The experts' held-out losses",
        "Bits per byte of each expert on each domain's held-out documents, from the build's "
        "check (the best on each domain in bold): the specialists are what the router has to "
        "find.",
        _losses_table(results),
        "## Loss against size",
        f"The router's choice with a `size` weight swept: a larger weight trades loss for "
        f"smaller experts ([table]({p['csv']})).",
        f"![Pareto front: loss against size]({p['png']})",
        "\n".join(f"- {line}" for line in p["calibration"]),
        f"Non-dominated: {', '.join(p['non_dominated'])}.",
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from serve_app.config import LibraryError
    from serve_app.learn.data import DataError

    try:
        results = run(args, argv)
    except (BenchError, LibraryError, DataError) as err:
        print(f"bench.routing: {err}", file=sys.stderr)
        return 2
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    page = args.docs / PAGE
    page.write_text(render(results))
    ev = results["evaluate"]
    print(f"{ev['n']} held-out prompts, {len(ev['experts'])} experts:")
    print(overall_table(ev))
    print(goal_line(ev).replace("**", ""))
    if results.get("grouped"):
        print("on sources the router never saw (grouped folds):")
        print(grouped_table(results["grouped"]))
    print(f"wrote {args.results}, {page}, {args.docs / PNG}, {args.docs / CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
