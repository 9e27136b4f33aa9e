"""Grouped evaluation: how a router does on text from sources it never trained on.

Random held-out rows share their sources with the training rows, so a router that learns a
source's style scores well on them and badly on the next source of the same domain. Here the
prompts of a profile are cut into folds by group (a source: serve_app.learn.grouped.
source_group), and for each fold the router is trained as `tryage train` trains it (early
stopping on groups held out of the training folds, its mix chosen over folds of them) on the
other folds only, then judged on the fold's prompts beside kNN and the best single expert
fitted on the same training folds. Every prompt is judged once, by a router that never saw
its group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from serve_app.config import LibraryError
from serve_app.learn.data import cut_text, data_files, prompt_id
from serve_app.learn.matrix import Matrix
from serve_app.learn.metrics import choose, expected_random, summarize
from serve_app.learn.train import (
    TrainConfig,
    fold_rest,
    folds_of,
    folds_within_domains,
    settle_mix,
    train_head_split,
)
from serve_app.router import Neighbours, predict_mixed

METHODS = ("router", "knn", "best_single", "oracle", "random")


def source_group(source: str) -> str:
    """The group of a corpus row's `source` ("owner/repo:path/to/file"): the source without
    its file name, so a repository's folders (a language of sample programs, a patent
    format) are groups of their own and a single-file source is one group."""
    repo, sep, path = source.partition(":")
    return f"{repo}:{path.rsplit('/', 1)[0]}" if sep and "/" in path else source


def corpus_groups(corpus: str | Path, chars: Iterable[int | None] = (None,)) -> dict[str, str]:
    """Prompt id -> group of every row of a corpus with a `source`, for the whole text and
    for its opening cut at each of `chars` (the demo's prompts are openings)."""
    out: dict[str, str] = {}
    for file in data_files(corpus):
        with file.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line) if line.strip() else {}
                if not isinstance(row.get("text"), str) or not row.get("source"):
                    continue
                group = source_group(str(row["source"]))
                for n in chars:
                    text = row["text"] if n is None else cut_text(row["text"], n)
                    out.setdefault(prompt_id(text), group)
    return out


@dataclass
class Grouped:
    """Figures of every method over all folds, overall and per domain."""

    folds: int
    groups: int
    n: int
    overall: dict[str, dict[str, float]]
    per_domain: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    mixes: list[dict] = field(default_factory=list)  # the mix chosen in each fold

    def table(self) -> str:
        lines = [
            f"grouped: {self.n} prompts in {self.groups} groups, {self.folds} folds "
            "(each judged by a router that never saw its group)",
            f"{'':<12} {'top1':>6} {'regret':>8}",
        ]
        for name, m in self.overall.items():
            lines.append(f"{name:<12} {m['top1']:>6.3f} {m['regret']:>8.4f}")
        return "\n".join(lines)


def cross_validate(
    matrix: Matrix,
    emb: torch.Tensor,
    groups: list[str],
    cfg: TrainConfig | None = None,
    folds: int = 5,
    k: int = 10,
    within_domains: bool = False,
) -> Grouped:
    """Grouped cross-validation of the router against kNN (k neighbours) and the best single
    expert (see the module docstring); `emb` (N, H) are the matrix's prompt embeddings.

    By default whole groups are held out, so a domain of one source is a domain the router
    never saw; `within_domains` holds out only sources of domains that have others
    (folds_within_domains), and judges only those prompts."""
    # The validation inside each fold asks the fold's question: new sources of known domains
    # ("source"), or new groups whatever their domain ("group").
    cfg = replace(cfg or TrainConfig(), group_by="source" if within_domains else "group")
    assert len(groups) == len(matrix.ids) == len(emb), "one group and embedding per prompt"
    if len(set(groups)) < 2 or folds < 2:
        raise LibraryError("grouped evaluation needs two folds and two groups at least")
    folds = min(folds, len(set(groups)))
    if within_domains:
        fold = folds_within_domains(groups, matrix.domains, folds)
        if (fold < 0).all():
            raise LibraryError("no domain has two or more groups to hold one out")
    else:
        fold = folds_of(groups, folds)
    judged = fold >= 0
    n, e = matrix.losses.shape
    scores = {m: np.full((n, e), np.nan) for m in ("router", "knn", "best_single")}
    mixes: list[dict] = []
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        rest, rest_emb, rest_groups, val = fold_rest(matrix, emb, groups, test, cfg)
        head, _, _, _ = train_head_split(rest_emb, rest, val, cfg)
        folded, _, _ = settle_mix(head, rest_emb, rest, val, cfg, rest_groups)  # as train does
        cfg_h = head.cfg
        mixes.append(
            {
                "prior_weight": cfg_h.prior_weight,
                "knn_weight": cfg_h.knn_weight,
                "base_weight": cfg_h.base_weight,
                "mix_folds": folded.folds if folded else 0,  # 0: chosen on validation
            }
        )
        test_emb = emb[torch.from_numpy(test)]
        neighbours = Neighbours(rest_emb, torch.tensor(rest.losses))
        with torch.no_grad():
            pred = predict_mixed(head, test_emb, neighbours)
        scores["router"][test] = pred.numpy()
        scores["knn"][test] = neighbours.mean_loss(test_emb, k).numpy()
        scores["best_single"][test] = np.nanmean(rest.losses, 0)[None, :]
    chosen = {m: choose(s) for m, s in scores.items()}
    chosen["oracle"] = choose(matrix.losses)

    def figures(keep: np.ndarray) -> dict[str, dict[str, float]]:
        keep = keep & judged
        out = {m: summarize(c[keep], matrix.losses[keep]) for m, c in chosen.items()}
        out["random"] = expected_random(matrix.losses[keep])
        return out

    domains = np.array(matrix.domains)
    return Grouped(
        folds=folds,
        groups=len({g for g, j in zip(groups, judged, strict=True) if j}),
        n=int(judged.sum()),
        overall=figures(np.ones(n, dtype=bool)),
        per_domain={d: figures(domains == d) for d in sorted(set(domains[judged]))},
        mixes=mixes,
    )
