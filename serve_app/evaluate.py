"""Evaluation: the learned router against the baselines, on the true losses of a data path.

Every router predicts a score per expert for every prompt (see serve_app.router); the expert
with the lowest score is chosen and judged on its true loss from a profile of the same
prompts (serve_app.metrics: top1, regret, mean_loss). Baselines:

    oracle       the true best expert (top1 = 1, regret = 0: the ceiling)
    random       a uniformly random expert, in expectation (exact, no sampling noise)
    best_single  the one expert with the lowest mean loss on the training profile
    model_card   the expert whose description is most similar to the prompt
    knn          the lowest mean loss over the k training prompts nearest the prompt
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from serve_app.config import LibraryConfig, LibraryError
from serve_app.metrics import choose, expected_random, summarize
from serve_app.router import (
    BestSingleRouter,
    Encoder,
    KnnRouter,
    LearnedRouter,
    ModelCardRouter,
    OracleRouter,
    Router,
    read_head_config,
)
from serve_app.train import REFERENCE, Matrix, pivot

BASELINES = ("oracle", "random", "best_single", "model_card", "knn")


def trained_ids(checkpoint: Path) -> set[str]:
    """Ids of the prompts the router was trained on (empty for an untrained router)."""
    from safetensors import safe_open

    file = Path(checkpoint) / REFERENCE
    if not file.exists():
        return set()
    with safe_open(str(file), framework="pt") as f:
        return set(json.loads(f.metadata().get("prompt_ids", "[]")))


def load_reference(checkpoint: Path) -> tuple[list[str], Any, Any]:
    """Training prompts' embeddings (N, H) and losses (N, E) saved by `tryage train`."""
    from safetensors import safe_open

    file = Path(checkpoint) / REFERENCE
    if not file.exists():
        raise LibraryError(
            f"{checkpoint}: no {REFERENCE}; the knn and best_single baselines need a router "
            "trained with tryage train"
        )
    with safe_open(str(file), framework="pt") as f:
        experts = json.loads(f.metadata()["experts"])
        return experts, f.get_tensor("embeddings"), f.get_tensor("losses")


def routers(library: LibraryConfig, truth: Matrix, *, k: int = 10) -> dict[str, Router]:
    """The learned router and every baseline, sharing one memoising encoder."""
    ckpt = library.router.checkpoint
    encoder = Encoder(library.router.model, read_head_config(ckpt).max_length, memo=True)
    learned = LearnedRouter(encoder, ckpt)
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
    return {
        "router": learned,
        "oracle": OracleRouter(by_text),
        "best_single": BestSingleRouter(truth.experts, losses.mean(0).tolist()),
        "model_card": ModelCardRouter(
            encoder, {e: library.expert(e).description for e in truth.experts}
        ),
        "knn": KnnRouter(encoder, truth.experts, emb, losses, k=k),
    }


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

    def as_json(self) -> dict:
        return {
            "n": self.n,
            "experts": self.experts,
            "router": self.router,
            "baselines": self.baselines,
            "per_domain": self.per_domain,
        }

    def table(self) -> str:
        """Readable tables: overall figures, then top-1 per domain."""
        methods = {"router": self.router, **self.baselines}
        lines = [
            f"{self.n} prompts, {len(self.experts)} experts: {', '.join(self.experts)}",
            "",
            f"{'':<12} {'top1':>6} {'regret':>8} {'loss':>8}",
        ]
        for name, m in methods.items():
            lines.append(f"{name:<12} {m['top1']:>6.3f} {m['regret']:>8.4f} {m['mean_loss']:>8.4f}")
        names = list(methods)
        for metric, title, fmt in (
            ("top1", "top1", ".3f"),
            ("regret", "regret (bits/byte)", ".4f"),
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
    )


def evaluate(
    library: LibraryConfig,
    table: pa.Table,
    *,
    experts: list[str] | None = None,
    k: int = 10,
) -> tuple[Evaluation, dict[str, np.ndarray], Matrix]:
    """Evaluate the library's router and the baselines on a profile of the data.

    Returns the figures, every method's scores (N, E), and the truth matrix.
    """
    truth = pivot(table, experts or library.names)
    if not truth.ids:
        raise LibraryError("no prompt of the data was measured on every expert")
    scores = {name: predictions(r, truth) for name, r in routers(library, truth, k=k).items()}
    chosen = {name: choose(s) for name, s in scores.items()}
    return score_choices(chosen, truth), scores, truth
