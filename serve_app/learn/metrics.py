"""Routing metrics over a truth matrix of losses (prompts x experts). Pure numpy.

top1:      share of prompts whose chosen expert has the lowest true loss (ties count as hits).
regret:    mean of (true loss of the chosen expert - lowest true loss).
mean_loss: mean true loss of the chosen experts.

Losses are bits per byte, or a negated score (serve_app.learn.matrix.Measure). A loss that
was never measured is NaN: a prompt whose chosen expert has none is left out of that
method's figures (`scored` says how many counted), and the best expert of a prompt is the
best among those measured.
"""

from __future__ import annotations

import numpy as np


def choose(scores: np.ndarray) -> np.ndarray:
    """Index of the lowest score in each row (N,); ties go to the first expert; NaN never
    wins unless a row has nothing else."""
    scores = np.asarray(scores, dtype=float)
    return np.where(np.isnan(scores), np.inf, scores).argmin(axis=1)


def _empty() -> dict[str, float]:
    return {"top1": float("nan"), "regret": float("nan"), "mean_loss": float("nan"), "scored": 0}


def summarize(chosen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """top1, regret and mean_loss of the chosen experts (N,) against the truth (N, E), over
    the `scored` prompts whose chosen expert was measured."""
    truth = np.asarray(truth, dtype=float)
    if len(truth) == 0:
        return _empty()
    picked = truth[np.arange(len(truth)), np.asarray(chosen)]  # (N,)
    known = ~np.isnan(picked)
    if not known.any():
        return _empty()
    best = np.nanmin(truth[known], axis=1)  # (n,)
    picked = picked[known]
    return {
        "top1": float(np.mean(picked <= best + 1e-12)),
        "regret": float(np.mean(picked - best)),
        "mean_loss": float(np.mean(picked)),
        "scored": int(known.sum()),
    }


def expected_random(truth: np.ndarray) -> dict[str, float]:
    """top1, regret and mean_loss of a uniformly random measured expert, in expectation."""
    truth = np.asarray(truth, dtype=float)
    if len(truth) == 0:
        return _empty()
    best = np.nanmin(truth, axis=1, keepdims=True)  # (N, 1)
    hit = np.where(np.isnan(truth), np.nan, (truth <= best + 1e-12).astype(float))
    return {
        "top1": float(np.mean(np.nanmean(hit, axis=1))),
        "regret": float(np.mean(np.nanmean(truth - best, axis=1))),
        "mean_loss": float(np.mean(np.nanmean(truth, axis=1))),
        "scored": len(truth),
    }


def expert_errors(pred: np.ndarray, truth: np.ndarray, experts: list[str]) -> dict[str, float]:
    """Mean absolute error of each expert's predicted loss over its measured prompts."""
    err = np.nanmean(np.abs(np.asarray(pred) - np.asarray(truth)), axis=0)  # (E,)
    return {name: float(e) for name, e in zip(experts, err, strict=True)}
