"""Evaluation: the learned router against the baselines, on the true losses of a data path.

Every router predicts a score per expert for every prompt (serve_app.router.Router); the
expert with the lowest score is chosen and judged on its true loss from a profile of the same
prompts (serve_app.learn.metrics: top1, regret, mean_loss). The baselines are those of
serve_app.learn.baselines, plus `random`: a uniformly random expert, in expectation (exact).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from serve_app.config import LibraryConfig, LibraryError
from serve_app.learn.baselines import make_router
from serve_app.learn.data import Prompt
from serve_app.learn.matrix import (
    BITS_PER_BYTE,
    Matrix,
    Measure,
    load_reference,
    pivot,
    trained_ids,
)
from serve_app.learn.metrics import choose, expected_random, summarize
from serve_app.router import Encoder, Router, read_head_config

if TYPE_CHECKING:
    from serve_app.learn.profile import ProfileRun

BASELINES = ("oracle", "random", "best_single", "model_card", "knn")


def routers(library: LibraryConfig, truth: Matrix, *, k: int = 10) -> dict[str, Router]:
    """The learned router and every baseline (by name), sharing one memoising encoder."""
    ckpt = library.router.checkpoint
    encoder = Encoder(
        library.router.model,
        read_head_config(ckpt).max_length,
        memo=True,
        revision=library.router.revision,  # the encoder the service pins
    )
    ref_experts, emb, losses = load_reference(ckpt)
    missing = [e for e in truth.experts if e not in ref_experts]
    if missing:
        raise LibraryError(f"{ckpt}: trained without expert(s) {', '.join(missing)}; retrain")
    cols = [ref_experts.index(e) for e in truth.experts]
    losses = losses[:, cols]  # (N, E) in the truth's expert order
    by_text = {
        t: dict(zip(truth.experts, row.tolist(), strict=True))
        for t, row in zip(truth.texts, truth.losses, strict=True)
    }
    cards = {e: library.expert(e).description for e in truth.experts}
    return {
        "router": make_router("learned", encoder=encoder, checkpoint=ckpt),
        "oracle": make_router("oracle", truth=by_text),
        "best_single": make_router(
            "best_single", experts=truth.experts, mean_loss=losses.nanmean(0).tolist()
        ),
        "model_card": make_router("model_card", encoder=encoder, cards=cards),
        "knn": make_router(
            "knn", encoder=encoder, experts=truth.experts, embeddings=emb, losses=losses, k=k
        ),
    }


def held_out(
    library: LibraryConfig,
    prompts: list[Prompt],
    log: Callable[[str], None] | None = None,
    data: str | Path = "the data",
) -> list[Prompt]:
    """The prompts the library's router was not trained on (`data` names them in messages)."""
    seen = trained_ids(library.router.checkpoint)
    kept = [p for p in prompts if p.id not in seen]
    if len(kept) < len(prompts) and log:
        log(
            f"leaving out {len(prompts) - len(kept)} prompt(s) the router was trained on "
            "(--include-trained keeps them)"
        )
    if not kept:
        raise LibraryError(f"every prompt in {data} was used to train the router")
    return kept


def measure_truth(
    library: LibraryConfig,
    prompts: list[Prompt],
    out: Path | None = None,
    *,
    folder: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ProfileRun:
    """Every expert's true loss on `prompts`: a profile (a Ray job) written to `out`, by
    default `FOLDER/profiles/eval-KEY.parquet` (KEY from the prompts' ids; FOLDER the
    library's, else the checkpoint's parent), so a rerun on the same prompts reuses it. A row
    that any profile in `FOLDER/profiles/` (the demo build's training profile, earlier
    evaluations) measured with the same expert weights is reused, not measured again. The
    run says how many rows it measured and reused; its table is the truth."""
    from serve_app.learn.profile import ProfileConfig, profile

    key = hashlib.sha1("".join(sorted(p.id for p in prompts)).encode()).hexdigest()[:12]
    folder = folder or library.router.checkpoint.parent
    out = out or folder / "profiles" / f"eval-{key}.parquet"
    reuse = sorted((folder / "profiles").glob("*.parquet"))
    if log:
        log(f"every expert's true loss on {len(prompts)} prompts ({out})")
    run = profile(
        library.experts, prompts, out, ProfileConfig(generate=0), progress=progress, reuse=reuse
    )
    if log:
        log(
            f"{run.measured} rows measured now, {run.reused} of {run.table.num_rows} measured "
            "before with the same weights"
        )
    return run


def stderr(message: str) -> None:
    """Progress messages of the offline commands."""
    print(message, file=sys.stderr, flush=True)


def predictions(router: Router, truth: Matrix, batch: int = 256) -> np.ndarray:
    """Scores (N, E) of a router on the truth's prompts, in the truth's expert order."""
    rows: list[list[float]] = []
    for i in range(0, len(truth.texts), batch):
        for pred in router.predict(truth.texts[i : i + batch]):
            rows.append([pred[e] for e in truth.experts])
    return np.array(rows, dtype=np.float64).reshape(len(truth.texts), len(truth.experts))


@dataclass
class Evaluation:
    """The figures of one evaluation; `as_json` is the contract's shape."""

    n: int
    experts: list[str]
    router: dict[str, float]
    baselines: dict[str, dict[str, float]]
    per_domain: dict[str, dict[str, float]]
    measure: Measure = BITS_PER_BYTE

    def as_json(self) -> dict:
        return {
            "n": self.n,
            "experts": self.experts,
            "measure": self.measure.as_json(),
            "router": self.router,
            "baselines": self.baselines,
            "per_domain": self.per_domain,
        }

    def table(self) -> str:
        """Readable tables: overall figures, then top-1 per domain."""
        methods = {"router": self.router, **self.baselines}
        name = self.measure.name[:10]
        lines = [
            f"{self.n} prompts, {len(self.experts)} experts: {', '.join(self.experts)}",
            f"measure: {self.measure.name}, {self.measure.direction}; regret in its units",
            "",
            f"{'':<12} {'top1':>6} {'regret':>8} {name:>10}",
        ]
        for name, m in methods.items():
            shown = self.measure.shown(m["mean_loss"])
            lines.append(f"{name:<12} {m['top1']:>6.3f} {m['regret']:>8.4f} {shown:>10.4f}")
        names = list(methods)
        for metric, title, fmt in (
            ("top1", "top1", ".3f"),
            ("regret", f"regret ({self.measure.name})", ".4f"),
        ):
            lines += ["", f"{title} by domain"]
            lines.append(f"{'domain':<14} {'n':>5} " + " ".join(f"{m:>11}" for m in names))
            for domain, d in self.per_domain.items():
                cells = " ".join(f"{d[f'{m}_{metric}']:>11{fmt}}" for m in names)
                lines.append(f"{domain:<14} {int(d['n']):>5} {cells}")
        return "\n".join(lines)


def score_choices(chosen: dict[str, np.ndarray], truth: Matrix) -> Evaluation:
    """Figures for each method's chosen experts (N,): overall and per domain."""
    overall = {name: summarize(c, truth.losses) for name, c in chosen.items()}
    overall["random"] = expected_random(truth.losses)
    if truth.measure.higher_is_better:  # the score itself beside its negation
        for figures in overall.values():
            figures["mean_score"] = -figures["mean_loss"]
    domains = np.array(truth.domains)
    per_domain: dict[str, dict[str, float]] = {}
    for domain in sorted(set(truth.domains)):
        keep = domains == domain
        row: dict[str, float] = {"n": int(keep.sum())}
        figures = {name: summarize(c[keep], truth.losses[keep]) for name, c in chosen.items()}
        figures["random"] = expected_random(truth.losses[keep])
        for name in ("router", *BASELINES):
            for metric, value in figures[name].items():
                row[f"{name}_{metric}"] = value
        per_domain[domain] = row
    return Evaluation(
        n=len(truth.ids),
        experts=truth.experts,
        router=overall["router"],
        baselines={b: overall[b] for b in BASELINES if b in overall},
        per_domain=per_domain,
        measure=truth.measure,
    )


def evaluate(
    library: LibraryConfig,
    table: pa.Table,
    *,
    experts: list[str] | None = None,
    task: str | None = None,
    k: int = 10,
) -> tuple[Evaluation, dict[str, np.ndarray], Matrix]:
    """Evaluate the library's router and the baselines on a profile of the data, among
    `experts` (default all), or the experts of one `task`.

    Returns the figures, every method's scores (N, E), and the truth matrix.
    """
    if task is not None:
        experts = [
            e.name
            for e in library.experts
            if e.task == task and e.name in (experts or library.names)
        ]
        if not experts:
            raise LibraryError(f"the library has no {task} expert")
    truth = pivot(table, experts or library.names, complete=False)
    if not truth.ids:
        raise LibraryError("no prompt of the data was measured on any expert")
    scores = {name: predictions(r, truth) for name, r in routers(library, truth, k=k).items()}
    chosen = {name: choose(s) for name, s in scores.items()}
    return score_choices(chosen, truth), scores, truth
