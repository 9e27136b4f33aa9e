"""The routers a user would try instead of the learned one, and the registry of routers by name.

Each predicts a score per expert for every prompt, lowest best, like the learned router's
predicted losses (serve_app.router.Router), so evaluation treats them all alike:

    oracle       the true best expert (top1 = 1, regret = 0: the ceiling)
    best_single  the one expert with the lowest mean loss on the training profile
    model_card   the expert whose description is most similar to the prompt
    knn          the lowest mean loss over the k training prompts nearest the prompt

(`random` is scored in expectation by serve_app.learn.metrics, not as a router.)
"""

from __future__ import annotations

import torch

from serve_app.router import Encoder, LearnedRouter, Neighbours, Router


class OracleRouter:
    """Knows every expert's true loss on the prompts it is asked about (the upper bound)."""

    def __init__(self, truth: dict[str, dict[str, float]]):
        self.truth = truth  # prompt text -> expert -> true loss
        self.experts = list(next(iter(truth.values()))) if truth else []

    def predict(self, prompts: list[str]) -> list[dict[str, float]]:
        return [dict(self.truth[p]) for p in prompts]


class BestSingleRouter:
    """Always the expert with the lowest mean loss on the training prompts."""

    def __init__(self, experts: list[str], mean_loss: list[float]):
        self.experts = list(experts)
        self.scores = dict(zip(self.experts, map(float, mean_loss), strict=True))

    def predict(self, prompts: list[str]) -> list[dict[str, float]]:
        return [dict(self.scores) for _ in prompts]


class ModelCardRouter:
    """Model selection by reading model cards: the expert whose description is most similar
    to the prompt (cosine of sentence embeddings; score = 1 - similarity)."""

    def __init__(self, encoder: Encoder, cards: dict[str, str]):
        self.encoder = encoder
        self.experts = list(cards)
        self.cards = encoder.encode([cards[e] or e for e in self.experts])  # (E, H)

    def predict(self, prompts: list[str]) -> list[dict[str, float]]:
        sim = self.encoder.encode(prompts) @ self.cards.T  # (B, E)
        return [dict(zip(self.experts, (1 - row).tolist(), strict=True)) for row in sim]


class KnnRouter:
    """The mean loss of each expert over the k training prompts nearest the prompt."""

    def __init__(
        self,
        encoder: Encoder,
        experts: list[str],
        embeddings: torch.Tensor,
        losses: torch.Tensor,
        k: int = 10,
    ):
        self.encoder = encoder
        self.experts = list(experts)
        self.neighbours = Neighbours(embeddings, losses)
        self.k = k

    def predict(self, prompts: list[str]) -> list[dict[str, float]]:
        mean = self.neighbours.mean_loss(self.encoder.encode(prompts), self.k)  # (B, E)
        return [dict(zip(self.experts, row.tolist(), strict=True)) for row in mean]


#: Routers by name; evaluation and serving build them through `make_router`.
ROUTERS = {
    "learned": LearnedRouter,
    "oracle": OracleRouter,
    "best_single": BestSingleRouter,
    "model_card": ModelCardRouter,
    "knn": KnnRouter,
}


def make_router(name: str, **kwargs) -> Router:
    """Build the router registered as `name`."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}")
    return ROUTERS[name](**kwargs)
