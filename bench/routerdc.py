"""RouterDC benchmark: tryage's router on RouterDC's per-prompt scores of 7 open LLMs.

    python -m bench.routerdc [--data DIR] [--work DIR] [--limit N] [--results FILE] [--docs DIR]

1. import  RouterDC's train split (`tryage scores import --format routerdc`'s code) into WORK
2. train   the router on it (`tryage train`'s code, frozen encoder), timed
3. route   RouterDC's test split with `tryage route`'s code, timed per prompt
4. score   every routed test row by RouterDC's own definition (MANIFEST.md): on multiple-choice
           tasks the chosen model counts 1 when its score is > 0; on GSM8K and HumanEval its
           score (the share of correct samples). Accuracy of a task = the mean over its rows;
           the headline is the mean over MMLU, GSM8K, CMMLU, ARC-C and HumanEval (Table 1).

Beside the router: the best single model (by train-split accuracy averaged like the
headline), kNN (mean train-split score of the 20 nearest train prompts, as the issue's probe),
the oracle, and RouterDC's published figure; every average with its standard error from the
draw of test prompts, and the router's lead over each method with its own, paired prompt by
prompt (RouterDC publishes no choices per prompt to pair with). Writes RESULTS
(bench/results/routerdc.json) and DOCS/routerdc.md with DOCS/routerdc.png. The data stays
in ../shared/routing (research use): nothing of it is copied into the project. Without it the
benchmark says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve_app.session import machine_info

ROOT = Path(__file__).resolve().parents[1]
SHARED_ROUTING = ROOT.parent / "shared" / "routing" / "routerdc"
TABLE1 = ("mmlu", "gsm8k", "cmmlu", "arc_challenge", "humaneval")
TASKS = (*TABLE1, "arc_easy")
#: The tasks the router trains on: RouterDC's own training script (train_scripts/
#: router_train.sh) trains on the five Table 1 tasks only. ARC-Easy's test split is routed as
#: a task the router never saw (shown, not averaged).
TRAIN_TASKS = TABLE1
#: RouterDC's published average over TABLE1 (its Table 1), accuracy %.
ROUTERDC_PUBLISHED = 58.54
#: Neighbours of the kNN baseline (the issue's probe: k = 20).
KNN_K = 20
PAGE, PNG = "routerdc.md", "routerdc.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.routerdc", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=SHARED_ROUTING, help="RouterDC's train/ and test/")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "tmp" / "routerdc")
    p.add_argument("--limit", type=int, help="at most N rows per task and split (a quick run)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "routerdc.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    return p.parse_args(argv)


def task_files(data: Path, split: str, tasks: tuple[str, ...] = TASKS) -> dict[str, Path]:
    """RouterDC's files of one split, by task."""
    return {t: data / split / f"{t}.json" for t in tasks if (data / split / f"{t}.json").is_file()}


def counted(task: str, score: float) -> float:
    """What a model's score counts on a task, by RouterDC's evaluation."""
    if task in ("gsm8k", "humaneval"):
        return float(score)
    return 1.0 if score > 0 else 0.0


def load_rows(files: dict[str, Path], limit: int | None) -> dict[str, list[dict]]:
    """Rows by task, the first `limit` of each file when limited."""
    return {t: json.loads(f.read_text())[:limit] for t, f in files.items()}


def counts(rows: dict[str, list[dict]], chosen: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """What the chosen model of every row counts (RouterDC's definition), by task."""
    return {
        t: np.array([counted(t, r["scores"][m]) for r, m in zip(rs, chosen[t], strict=True)])
        for t, rs in rows.items()
    }


def task_counts(rows: dict[str, list[dict]], model_of: dict[str, str]) -> dict[str, np.ndarray]:
    """`counts` when every row of a task goes to one model, `model_of[task]`."""
    return counts(rows, {t: [model_of[t]] * len(rs) for t, rs in rows.items()})


def accuracy(counted_rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy % per task: the mean of what its rows count."""
    return {t: 100 * float(np.mean(v)) for t, v in counted_rows.items()}


def headline(acc: dict[str, float]) -> float:
    """The mean over RouterDC's Table 1 tasks."""
    return float(np.mean([acc[t] for t in TABLE1 if t in acc]))


def headline_se(counted_rows: dict[str, np.ndarray]) -> float:
    """Standard error (points) of the headline from the draw of test prompts: each Table 1
    task's standard error of the mean, the tasks independent, averaged like the headline.
    Given a difference of two methods' counts row by row, it is the paired difference's."""
    se = [
        np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan
        for t, v in counted_rows.items()
        if t in TABLE1
    ]
    return 100 * float(np.sqrt(np.sum(np.square(se)))) / len(se)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any] | None:
    from serve_app.config import load_library
    from serve_app.learn.matrix import pivot
    from serve_app.learn.profile import read_profile
    from serve_app.learn.route import route_data
    from serve_app.learn.scores import import_scores
    from serve_app.learn.train import TrainConfig, embeddings, train
    from serve_app.router import Encoder, LearnedRouter, Neighbours

    train_files = task_files(args.data, "train", TRAIN_TASKS)
    test_files = task_files(args.data, "test")
    if not train_files or not test_files:
        print(f"bench.routerdc: no RouterDC data at {args.data}; skipped", file=sys.stderr)
        return None
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # 1. import (a limited run imports limited copies, written under WORK)
    train_rows = load_rows(train_files, args.limit)
    sources = list(train_files.values())
    if args.limit:
        sources = []
        for t, rows in train_rows.items():
            f = work / "train-limited" / f"{t}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(rows))
            sources.append(f)
    start = time.perf_counter()
    imported = import_scores("routerdc", sources, work / "import")
    import_s = time.perf_counter() - start
    library_path = imported.library
    # 2. train
    library = load_library(library_path, router=False)
    table = read_profile(imported.profile)
    start = time.perf_counter()
    cache = imported.profile.with_name("profile.parquet.embeddings")  # as tryage train's
    report = train(library, table, library.router.checkpoint, TrainConfig(), cache=cache)
    train_s = time.perf_counter() - start
    library = load_library(library_path)
    # 3. route the test split: one data row per test row, in order
    test_rows = load_rows(test_files, args.limit)
    data = work / "test.jsonl"
    with data.open("w") as f:
        for t, rows in test_rows.items():
            for r in rows:
                f.write(json.dumps({"text": r["question"], "domain": t}) + "\n")
    decisions = work / "test-routed.jsonl"
    # One encoder for routing and the kNN baseline: it remembers the test prompts' embeddings,
    # so kNN does not embed the 10,000 prompts a second time.
    encoder = Encoder(library.router.model, max_length=TrainConfig().max_length, memo=True)
    router = LearnedRouter(encoder, library.router.checkpoint)
    routed = route_data(library, data, decisions, router=router)
    by_name = {e.name: e.model for e in library.experts}
    chosen: dict[str, list[str]] = {t: [] for t in test_rows}
    with decisions.open(encoding="utf-8") as f:  # by "\n": a text may hold U+2028
        decided = [json.loads(line) for line in f]
    refused = sum(row["expert"] is None for row in decided)
    if refused:  # the service would refuse these rows: say so rather than guess a model
        raise SystemExit(f"bench.routerdc: tryage route refused {refused} test rows")
    for row in decided:
        chosen[row["domain"]].append(by_name[row["expert"]])
    # 4. score, with the baselines
    models = list(by_name.values())
    got = {"router": counts(test_rows, chosen)}
    train_acc = {m: accuracy(task_counts(train_rows, dict.fromkeys(train_rows, m))) for m in models}
    best = max(models, key=lambda m: headline(train_acc[m]))
    got["best_single"] = task_counts(test_rows, dict.fromkeys(test_rows, best))
    # Told each prompt's task: that task's best model on the train split (ARC-Easy, never
    # trained on, its best single). What recognising the task perfectly would score.
    per_task = {
        t: max(models, key=lambda m: train_acc[m][t]) if t in train_rows else best
        for t in test_rows
    }
    got["task_best"] = task_counts(test_rows, per_task)
    got["oracle"] = {
        t: np.array([max(counted(t, s) for s in r["scores"].values()) for r in rs])
        for t, rs in test_rows.items()
    }
    # kNN over the train split's embeddings (cached by training) and its scores.
    matrix = pivot(table, library.names, complete=False)
    ref = embeddings(encoder, matrix, cache)
    near = Neighbours(ref, torch.tensor(matrix.losses))
    knn_chosen: dict[str, list[str]] = {}
    for t, rows in test_rows.items():
        emb = encoder.encode([r["question"] for r in rows])
        pred = near.mean_loss(emb, KNN_K).numpy()
        knn_chosen[t] = [
            by_name[library.names[j]] for j in np.nan_to_num(pred, nan=np.inf).argmin(1)
        ]
    got["knn"] = counts(test_rows, knn_chosen)
    acc = {name: accuracy(c) for name, c in got.items()}
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": shlex.join(["python", "-m", "bench.routerdc", *argv]),
        "limit": args.limit,
        "rows": {
            "train": {t: len(r) for t, r in train_rows.items()},
            "test": {t: len(r) for t, r in test_rows.items()},
        },
        "accuracy": acc,
        "average": {name: headline(a) for name, a in acc.items()},
        # Sampling error of the test prompts: each method's headline, and the router's lead
        # over each other method, paired prompt by prompt.
        "standard_error": {name: headline_se(c) for name, c in got.items()},
        "router_minus_se": {
            name: headline_se({t: got["router"][t] - c[t] for t in c})
            for name, c in got.items()
            if name != "router"
        },
        "published": {"routerdc": ROUTERDC_PUBLISHED},
        "best_single_model": best,
        "router": {
            "encoder": "minilm (all-MiniLM-L6-v2, the packaged encoder)",
            "train_s": train_s,
            "import_s": import_s,
            "epochs": report.epochs,
            "prior_weight": report.prior_weight,
            "knn_weight": report.knn_weight,
            "base_weight": report.base_weight,
            "knn_k": report.knn_k,
            "mix_folds": report.mix_folds,
            "val": report.val,
            "route_ms_per_prompt": routed.ms_per_prompt,
            "routed": routed.rows,
        },
    }


NAMES = {
    "router": "tryage router",
    "knn": f"kNN (k={KNN_K})",
    "best_single": "best single model",
    "task_best": "told the task: its best model on the train split",
    "oracle": "oracle",
}


def render(results: dict) -> str:
    """The benchmark's Markdown page, from the results dict alone."""
    acc, avg, r, m = results["accuracy"], results["average"], results["router"], results["machine"]
    tasks = [t for t in TASKS if t in acc["router"]]
    head = "| method | " + " | ".join(tasks) + " | **Table 1 average** |"
    lines = [
        "# RouterDC benchmark",
        "",
        f"Run {results['date']} on {m['platform']}, {m['cpus']} CPUs, device {m['device']}, "
        f"torch {m['torch']}:",
        "",
        f"```bash\n{results['command']}\n```",
        "",
        "RouterDC's per-prompt scores of 7 open 7-8B LLMs (`../shared/routing/routerdc`, "
        "research use, never copied here) are imported with `tryage scores import --format "
        "routerdc`; the router trains on the **train split** of the five tasks of RouterDC's "
        "Table 1, as RouterDC's own training script does (its validation is a share of those "
        "prompts), then `tryage route` routes every row of the **test split**, which nothing "
        "here was tuned on. ARC-Easy, which the router never trained on, is routed too: shown, "
        "not averaged. Accuracy follows RouterDC's own evaluation: a multiple-choice answer "
        "counts when the chosen model's score is > 0, GSM8K and HumanEval count the share of "
        "correct samples. The average is over the five tasks of Table 1.",
        "",
        "Accuracy % on the test split:",
        "",
        head,
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for name in ("router", "knn", "best_single", "task_best", "oracle"):
        cells = " | ".join(f"{acc[name][t]:.2f}" for t in tasks)
        lines.append(f"| {NAMES[name]} | {cells} | **{avg[name]:.2f}** |")
    lines.append(
        "| RouterDC, published (86M-parameter encoder) |"
        + " |" * len(tasks)
        + f" **{ROUTERDC_PUBLISHED:.2f}** |"
    )
    gap = avg["router"] - ROUTERDC_PUBLISHED
    se, lead = results["standard_error"], results["router_minus_se"]
    lines += [
        "",
        f"The router is {avg['router'] - avg['best_single']:+.2f} points from the best single "
        f"model (± {lead['best_single']:.2f}), {avg['router'] - avg['knn']:+.2f} from kNN "
        f"(± {lead['knn']:.2f}) and {gap:+.2f} from RouterDC's published average.",
        "",
        "*Told the task* is not a router: it is given each test prompt's task and routes it to "
        "that task's best model on the train split, so it scores what recognising the task "
        "perfectly would. The router, which reads only the prompt, is "
        f"{avg['router'] - avg['task_best']:+.2f} from it "
        f"(± {lead['task_best']:.2f}).",
        "",
        "Standard errors (±) are from the draw of test prompts: a Table 1 task's standard "
        "error of the mean, the five averaged like the headline; against another method here, "
        f"of the difference prompt by prompt. The router's average is {avg['router']:.2f} ± "
        f"{se['router']:.2f}. RouterDC's choices per prompt are not published, so the gap to "
        "its figure has no paired error here.",
        "",
        f"Best single model (chosen on the train split): `{results['best_single_model']}`. "
        f"Rows: {sum(results['rows']['train'].values())} train, "
        f"{sum(results['rows']['test'].values())} test"
        + (f" (limited to {results['limit']} a task)" if results["limit"] else "")
        + ".",
        "",
        "## The router",
        "",
        f"- Encoder `{r['encoder']}`: 22.7M parameters, frozen. The served prediction of "
        "every model's accuracy on a prompt mixes the head's MLP, a domain prior (a linear "
        "classifier of the task times each task's mean accuracy per model) and neighbour "
        "evidence; "
        + (
            f"out-of-fold predictions over {r['mix_folds']} folds of the train split chose "
            if r.get("mix_folds")
            else "validation on the train split chose "
        )
        + f"{1 - r['prior_weight'] - r['knn_weight'] - r.get('base_weight', 0):g} MLP + "
        f"{r['prior_weight']:g} prior + {r['knn_weight']:g} neighbours + "
        f"{r.get('base_weight', 0):g} base rate "
        f"({'out-of-fold' if r.get('mix_folds') else 'validation'} top-1 "
        f"{r['val']['top1']:.3f}).",
        f"- Import {r['import_s']:.1f} s; training {r['train_s']:.1f} s ({r['epochs']} epochs, "
        "the embedding of the train split included unless cached).",
        f"- Routing cost: {r['route_ms_per_prompt']:.2f} ms a prompt over {r['routed']} test "
        "prompts, batched 64 (encoder, head, neighbours and the objective), on this machine's "
        "CPUs.",
        "",
        f"![accuracy by task]({PNG})",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Grouped bars: accuracy per task and on average, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, avg = results["accuracy"], results["average"]
    tasks = [t for t in TABLE1 if t in acc["router"]]
    labels = [*tasks, "average"]
    methods = ("router", "knn", "best_single", "task_best", "oracle")
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=120)
    width = 0.8 / len(methods)
    for i, name in enumerate(methods):
        values = [acc[name][t] for t in tasks] + [avg[name]]
        ax.bar(np.arange(len(labels)) + i * width, values, width, label=NAMES[name])
    ax.axhline(
        ROUTERDC_PUBLISHED, color="black", ls="--", lw=1, label="RouterDC average (published)"
    )
    ax.set_xticks(np.arange(len(labels)) + width * (len(methods) - 1) / 2, labels)
    ax.set_ylabel("accuracy % (test split)")
    ax.set_title("Routing RouterDC's test split among 7 LLMs")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results = run(args, argv)
    if results is None:
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.docs.mkdir(parents=True, exist_ok=True)
    plot(results, args.docs / PNG)
    (args.docs / PAGE).write_text(render(results))
    for name, value in results["average"].items():
        print(f"{NAMES[name]:<20} {value:6.2f} ± {results['standard_error'][name]:.2f}")
    print(f"{'RouterDC (published)':<20} {ROUTERDC_PUBLISHED:6.2f}")
    print(f"wrote {args.results} and {args.docs / PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
