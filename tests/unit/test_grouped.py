"""Grouped evaluation: folds of whole sources, each judged by a router that never saw it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.learn.grouped import cross_validate, source_group
from serve_app.learn.matrix import Matrix
from serve_app.learn.train import (
    TrainConfig,
    folds_of,
    folds_within_domains,
    mix_folds_of,
    validation_mask,
)


def test_a_source_group_is_the_source_without_its_file_name():
    assert source_group("o/sample-programs:archive/n/nim/baklava.nim") == (
        "o/sample-programs:archive/n/nim"
    )
    assert source_group("o/news:test.csv") == "o/news:test.csv"
    assert source_group("no-colon") == "no-colon"


def test_folds_keep_groups_whole_and_balanced():
    groups = ["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 20 + ["e"] * 10
    fold = folds_of(groups, 3)
    for g in set(groups):
        assert len({f for f, h in zip(fold, groups, strict=True) if h == g}) == 1
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 20


def _synthetic(seed: int = 0) -> tuple[Matrix, torch.Tensor, list[str]]:
    """3 domains x 4 sources; expert i is best on domain i; a source shifts the embedding."""
    rng = np.random.default_rng(seed)
    dim, ids, texts, domains, groups, emb, losses = 16, [], [], [], [], [], []
    axes = rng.normal(size=(3, dim))
    for d in range(3):
        for g in range(4):
            offset = rng.normal(scale=0.6, size=dim)
            for i in range(20):
                ids.append(f"{d}-{g}-{i}")
                texts.append(ids[-1])
                domains.append(f"dom{d}")
                groups.append(f"src{d}{g}")
                emb.append(axes[d] + offset + rng.normal(scale=0.3, size=dim))
                row = 2.0 + rng.normal(scale=0.05, size=3)
                row[d] -= 0.5
                losses.append(row)
    e = torch.nn.functional.normalize(torch.tensor(np.array(emb), dtype=torch.float32), dim=1)
    m = Matrix(ids, texts, domains, ["e0", "e1", "e2"], np.array(losses))
    return m, e, groups


def test_validation_by_group_holds_out_whole_groups():
    m, _, groups = _synthetic()
    val = validation_mask(m, TrainConfig(group_by="group", val_fraction=0.25), groups)
    held = {g for g, v in zip(groups, val, strict=True) if v}
    kept = {g for g, v in zip(groups, val, strict=True) if not v}
    assert held and kept and not held & kept


def test_validation_by_prompt_or_of_a_single_group_draws_a_share_of_prompts():
    m, _, groups = _synthetic()
    cfg = TrainConfig(group_by="prompt", val_fraction=0.25)
    by_prompt = validation_mask(m, cfg)
    assert 0 < by_prompt.mean() < 0.5
    one = ["all"] * len(groups)  # nothing to hold out whole: the same draw by prompt
    for group_by in ("group", "source"):
        grouped = TrainConfig(group_by=group_by, val_fraction=0.25)
        assert (validation_mask(m, grouped, one) == by_prompt).all()
    with pytest.raises(ValueError, match="with groups"):
        validation_mask(m, TrainConfig(group_by="group"))


def test_every_prompt_is_judged_by_a_router_that_never_saw_its_source():
    m, e, groups = _synthetic()
    result = cross_validate(m, e, groups, TrainConfig(max_epochs=40, mix_folds=2), folds=4)
    assert result.n == len(m.ids) and result.groups == 12 and len(result.mixes) == 4
    # Each fold's router chose its mix as `tryage train` does: over folds of the other
    # folds' sources (180 prompts, 9 sources; two folds keep the test quick).
    assert [mix["mix_folds"] for mix in result.mixes] == [2] * 4
    overall = result.overall
    assert overall["router"]["scored"] == len(m.ids)
    # Unseen sources of seen domains: the router finds each domain's expert, the single
    # best expert cannot.
    assert overall["router"]["top1"] > 0.9 > overall["best_single"]["top1"]
    assert overall["oracle"]["top1"] == 1.0
    assert set(result.per_domain) == {"dom0", "dom1", "dom2"}


def test_new_sources_of_known_domains_hold_out_only_domains_with_several_sources():
    m, e, groups = _synthetic()
    # dom2 has one source only: it always trains, and is never judged.
    groups = [g if not g.startswith("src2") else "src2-only" for g in groups]
    fold = folds_within_domains(groups, m.domains, 3)
    assert (fold[np.array(m.domains) == "dom2"] == -1).all()
    assert (fold[np.array(m.domains) != "dom2"] >= 0).all()
    cfg = TrainConfig(max_epochs=40, mix_folds=0)  # each mix chosen on its validation draw
    result = cross_validate(m, e, groups, cfg, folds=3, within_domains=True)
    assert result.n == 160 and set(result.per_domain) == {"dom0", "dom1"}
    assert [mix["mix_folds"] for mix in result.mixes] == [0] * 3
    assert result.overall["router"]["top1"] > 0.9 > result.overall["best_single"]["top1"]


def test_validation_by_source_holds_out_sources_within_their_domains():
    m, _, groups = _synthetic()
    val = validation_mask(m, TrainConfig(group_by="source", val_fraction=0.25), groups)
    for d in ("dom0", "dom1", "dom2"):  # every domain keeps a source to train on and gives one
        mine = [(g, v) for g, v, dom in zip(groups, val, m.domains, strict=True) if dom == d]
        assert {g for g, v in mine if v} and {g for g, v in mine if not v}


def test_the_mix_folds_are_drawn_as_validation_is():
    m, _, groups = _synthetic()

    def whole(fold: np.ndarray, by: list[str]) -> bool:
        return all(len({f for f, b in zip(fold, by, strict=True) if b == g}) == 1 for g in by)

    by_group = mix_folds_of(m, TrainConfig(group_by="group"), groups)
    assert whole(by_group, groups) and set(by_group) == set(range(5))
    by_domain = mix_folds_of(m, TrainConfig(group_by="domain"), groups)
    assert whole(by_domain, m.domains) and set(by_domain) == {0, 1, 2}
    by_prompt = mix_folds_of(m, TrainConfig(), groups)
    assert not whole(by_prompt, groups) and set(by_prompt) == set(range(5))
    # Two domains of one source each and 30 prompts of two sources in the third: 30 prompts
    # held out in two folds of sources are too few to choose a mix on.
    keep = np.arange(len(m.ids)) < 190
    few = m.subset(keep)
    lopsided = [d if d != "dom2" else g for d, g in zip(few.domains, groups, strict=False)]
    assert len(set(lopsided)) == 4 and len(few.ids) >= 100
    assert mix_folds_of(few, TrainConfig(group_by="source"), lopsided) is None
    assert mix_folds_of(m, TrainConfig(group_by="source"), groups) is not None
