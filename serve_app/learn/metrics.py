"""Routing metrics over a truth matrix of losses (prompts x experts). Pure numpy.

top1:      share of prompts whose chosen expert has the lowest true loss (ties count as hits).
regret:    mean of (true loss of the chosen expert - lowest true loss), in bits per byte.
mean_loss: mean true loss of the chosen experts, in bits per byte.
"""

from __future__ import annotations

import numpy as np


def choose(scores: np.ndarray) -> np.ndarray:
    """Index of the lowest score in each row (N,); ties go to the first expert."""
    return np.asarray(scores).argmin(axis=1)


def summarize(chosen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """top1, regret and mean_loss of the chosen experts (N,) against the truth (N, E)."""
    truth = np.asarray(truth, dtype=float)
    if len(truth) == 0:
        return {"top1": float("nan"), "regret": float("nan"), "mean_loss": float("nan")}
    picked = truth[np.arange(len(truth)), chosen]  # (N,)
    best = truth.min(axis=1)  # (N,)
    return {
        "top1": float(np.mean(picked <= best + 1e-12)),
        "regret": float(np.mean(picked - best)),
        "mean_loss": float(np.mean(picked)),
    }


def expected_random(truth: np.ndarray) -> dict[str, float]:
    """top1, regret and mean_loss of a uniformly random expert, in expectation (exact)."""
    truth = np.asarray(truth, dtype=float)
    if len(truth) == 0:
        return {"top1": float("nan"), "regret": float("nan"), "mean_loss": float("nan")}
    best = truth.min(axis=1, keepdims=True)  # (N, 1)
    return {
        "top1": float(np.mean(truth <= best + 1e-12)),
        "regret": float(np.mean(truth - best)),
        "mean_loss": float(np.mean(truth)),
    }


def expert_errors(pred: np.ndarray, truth: np.ndarray, experts: list[str]) -> dict[str, float]:
    """Mean absolute error of each expert's predicted loss, bits per byte."""
    err = np.abs(np.asarray(pred) - np.asarray(truth)).mean(axis=0)  # (E,)
    return {name: float(e) for name, e in zip(experts, err, strict=True)}
