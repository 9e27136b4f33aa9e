"""The Pareto front between accuracy and one secondary goal, by sweeping one weight.

For each weight value the router's choice on every prompt is the expert with the lowest
predicted loss + weight * penalty (the serving objective with that one weight); each choice
is judged on its true loss. Every single expert is a point too. A point is on the front
(non-dominated) when no other point has both a lower or equal mean true loss and a lower or
equal mean penalty, one of them strictly. Every point is judged on the same prompts: those
measured on every expert compared (imported scores have gaps; a prompt missing a score would
count for some points and not others).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from serve_app.config import WEIGHT_NAMES, LibraryConfig, LibraryError
from serve_app.learn.matrix import BITS_PER_BYTE, Matrix, Measure
from serve_app.learn.metrics import choose, summarize
from serve_app.objective import penalties

#: Weight values swept by default: fine steps where choices change fastest.
SWEEP = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


@dataclass
class Point:
    """One row of pareto.csv."""

    kind: str  # "router" (a weight value of the sweep) or "expert" (always that expert)
    label: str
    weight: float | None
    mean_loss: float  # true loss of the choices (a score negated: Matrix.measure)
    mean_penalty: float  # the swept weight's penalty of the choices, in [0, 1]
    mean_params: float  # parameters of the chosen experts
    top1: float
    regret: float
    mean_cost: float | None = None  # the profile's measured cost of the choices, where it has one
    prompts: int = 0  # prompts judged: the same for every point
    pareto: bool = False


def penalty_vector(library: LibraryConfig, experts: list[str], weight: str) -> np.ndarray:
    """Each expert's penalty (E,) for one weight, in [0, 1]."""
    table = penalties(library.experts)
    missing = [e for e in experts if table[e][weight] is None]
    if missing:
        raise LibraryError(
            f"weight {weight!r} needs a measured {weight} for every expert; "
            f"{', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} none "
            "(tryage profile measures verbosity and readability of text-generation experts)"
        )
    return np.array([table[e][weight] for e in experts], dtype=np.float64)


def sweep(
    library: LibraryConfig,
    predicted: np.ndarray,
    truth: Matrix,
    weight: str,
    values: tuple[float, ...] = SWEEP,
) -> list[Point]:
    """Router points for each weight value, one point per expert, the front marked; all on
    the prompts of `truth` measured on every expert."""
    pen = penalty_vector(library, truth.experts, weight)  # (E,)
    complete = ~np.isnan(truth.losses).any(axis=1)
    if weight == "cost" and truth.costs is not None:  # the costs compared, too
        complete &= ~np.isnan(truth.costs).any(axis=1)
    if not complete.any():
        raise LibraryError(
            f"no prompt was measured (and, for cost, priced) on all {len(truth.experts)} "
            "experts compared; the Pareto front compares every point on the same prompts "
            "(--task, or a profile with fewer gaps)"
        )
    truth, predicted = truth.subset(complete), np.asarray(predicted)[complete]
    params = np.array([float(library.expert(e).params or 0) for e in truth.experts])  # (E,)
    rows = np.arange(len(truth.ids))

    def point(kind: str, label: str, value: float | None, chosen: np.ndarray) -> Point:
        m = summarize(chosen, truth.losses)
        cost = None
        if truth.costs is not None:  # what the choices cost, measured per prompt
            cost = float(np.nanmean(truth.costs[rows, chosen]))
        return Point(
            kind,
            label,
            value,
            m["mean_loss"],
            float(pen[chosen].mean()),
            float(params[chosen].mean()),
            m["top1"],
            m["regret"],
            cost,
            m["scored"],
        )

    points = [
        point("router", f"{weight}={value:g}", value, choose(predicted + value * pen[None, :]))
        for value in values
    ]
    points += [
        point("expert", name, None, np.full(len(truth.ids), j))
        for j, name in enumerate(truth.experts)
    ]
    for p in points:
        p.pareto = not any(_dominates(q, p, weight) for q in points)
    return points


def _axis(p: Point, weight: str) -> float:
    """The secondary goal of a point: the measured cost where the weight is cost and the
    profile has costs, else the mean penalty."""
    return p.mean_cost if weight == "cost" and p.mean_cost is not None else p.mean_penalty


def _dominates(a: Point, b: Point, weight: str) -> bool:
    x, y = _axis(a, weight), _axis(b, weight)
    no_worse = a.mean_loss <= b.mean_loss and x <= y
    better = a.mean_loss < b.mean_loss or x < y
    return no_worse and better


def calibration(points: list[Point], weight: str, measure: Measure = BITS_PER_BYTE) -> list[str]:
    """What each swept value of the weight trades, in words a user can pick from.

    Quality is the share of the router's gain over the worst single expert that is kept:
    100% is the router at weight 0, 0% the worst single expert's mean loss (the "performance
    gap recovered" of RouteLLM, in the profile's measure).
    """
    sweep_points = [p for p in points if p.kind == "router"]
    base = next((p for p in sweep_points if p.weight == 0), sweep_points[0])
    worst = max(p.mean_loss for p in points if p.kind == "expert")
    gain = worst - base.mean_loss
    # Consecutive values with the same outcome share a line: "size 0.1-10 keeps ...".
    runs: list[list[Point]] = []
    for p in sweep_points:
        last = runs[-1][-1] if runs else None
        if last and (last.mean_loss, _axis(last, weight)) == (p.mean_loss, _axis(p, weight)):
            runs[-1].append(p)
        else:
            runs.append([p])
    unit = measure.name
    lines = []
    for run in runs:
        p = run[0]
        values = f"{p.weight:g}" if len(run) == 1 else f"{p.weight:g}-{run[-1].weight:g}"
        kept = (worst - p.mean_loss) / gain if gain > 0 else 1.0
        if weight == "size" and base.mean_params:
            cost = f"{p.mean_params / base.mean_params:.0%} of the parameters"
        elif weight == "cost" and p.mean_cost is not None and base.mean_cost:
            cost = f"{p.mean_cost / base.mean_cost:.0%} of the cost ({p.mean_cost:.3g} a prompt)"
        else:
            cost = (
                f"a mean {weight} penalty of {p.mean_penalty:.2f} (at 0: {base.mean_penalty:.2f})"
            )
        lines.append(
            f"{weight} {values} keeps {kept:.0%} of the quality "
            f"({measure.shown(p.mean_loss):.3f} {unit}) at {cost}"
        )
    lines.append(
        f"(quality: 100% = the router at {weight} 0, {measure.shown(base.mean_loss):.3f} {unit}; "
        f"0% = the worst single expert, {measure.shown(worst):.3f} {unit})"
    )
    return lines


def write_csv(points: list[Point], path: Path, measure: Measure = BITS_PER_BYTE) -> None:
    """pareto.csv: one row per point, the fields of Point; for a profile of scores (higher is
    better), `mean_score` (the score itself) in place of `mean_loss`."""

    name = "mean_score" if measure.higher_is_better else "mean_loss"

    def row(p: Point) -> dict:
        fields = asdict(p)  # mean_loss renamed and shown in the measure's own sign, in place
        return {(name if k == "mean_loss" else k): v for k, v in fields.items()} | {
            name: measure.shown(p.mean_loss)
        }

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row(points[0])))
        writer.writeheader()
        for p in points:
            writer.writerow(row(p))


def plot(points: list[Point], weight: str, path: Path, measure: Measure = BITS_PER_BYTE) -> None:
    """pareto.png: mean true quality against the secondary goal (the measured cost for
    `cost` where the profile has one, else the mean penalty); experts as points, the sweep
    as a line, the non-dominated points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xy(p: Point) -> tuple[float, float]:
        return _axis(p, weight), measure.shown(p.mean_loss)

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    sweep_points = [p for p in points if p.kind == "router"]
    ax.plot(
        *zip(*map(xy, sweep_points), strict=True),
        "-o",
        color="tab:blue",
        label=f"router, {weight} weight swept",
        zorder=2,
    )
    shown: set[tuple[float, float]] = set()
    for p in sweep_points:  # one label per distinct point: high weights often share one
        if xy(p) in shown:
            continue
        shown.add(xy(p))
        ax.annotate(
            f"{p.weight:g}",
            xy(p),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
            color="tab:blue",
        )
    experts = [p for p in points if p.kind == "expert"]
    ax.scatter(
        *zip(*map(xy, experts), strict=True),
        marker="s",
        color="tab:orange",
        label="single expert",
        zorder=2,
    )
    for p in experts:
        ax.annotate(p.label, xy(p), fontsize=8, xytext=(4, -10), textcoords="offset points")
    front = [p for p in points if p.pareto]
    ax.scatter(
        *zip(*map(xy, front), strict=True),
        s=160,
        facecolors="none",
        edgecolors="black",
        label="non-dominated",
        zorder=3,
    )
    if weight == "cost" and points[0].mean_cost is not None:
        ax.set_xlabel("mean measured cost of the chosen experts' answers, a prompt")
    else:
        ax.set_xlabel(f"mean {weight} penalty of the chosen experts (0 best, 1 worst)")
    ax.set_ylabel(f"mean true {measure.name} ({measure.direction})")
    ax.set_title(f"Pareto front: {measure.name} against {weight}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_weight(weight: str) -> None:
    """Refuse a weight name the objective does not know."""
    if weight not in WEIGHT_NAMES:
        raise LibraryError(f"unknown weight {weight!r}; known: {', '.join(WEIGHT_NAMES)}")


@dataclass
class ParetoResult:
    """A sweep's points and what each value trades, in words (calibration.txt)."""

    points: list[Point]
    lines: list[str]


def run_pareto(
    library: LibraryConfig,
    table: pa.Table,
    weight: str,
    out: Path,
    values: list[float] | tuple[float, ...] | None = None,
    task: str | None = None,
    k: int = 10,
) -> ParetoResult:
    """Sweep `weight` over the truth `table`; write pareto.csv, pareto.png and calibration.txt
    into `out`. Verbosity and readability compare text-generation experts only (they are
    measured on what experts write)."""
    from serve_app.learn.evaluate import evaluate

    check_weight(weight)
    task = task or ("text-generation" if weight in ("verbosity", "readability") else None)
    _, scores, truth = evaluate(library, table, task=task, k=k)
    points = sweep(library, scores["router"], truth, weight, tuple(values) if values else SWEEP)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(points, out / "pareto.csv", truth.measure)
    plot(points, weight, out / "pareto.png", truth.measure)
    lines = calibration(points, weight, truth.measure)
    left_out = len(truth.ids) - points[0].prompts
    if left_out:
        unscored = int(np.isnan(truth.losses).any(axis=1).sum())
        why = f"{unscored} without every expert's score"
        if left_out > unscored:
            why += f", {left_out - unscored} without every expert's cost"
        lines.append(
            f"(every point on the {points[0].prompts} prompts measured on every expert; "
            f"{left_out} of {len(truth.ids)} left out: {why})"
        )
    (out / "calibration.txt").write_text("\n".join(lines) + "\n")
    return ParetoResult(points, lines)
