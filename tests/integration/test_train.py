"""Training modes on the hand-made profile of test_evaluate."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.cli import main
from serve_app.config import load_library
from serve_app.learn.data import in_split, prompt_id
from serve_app.learn.profile import PROFILE_SCHEMA
from serve_app.learn.train import TrainConfig, mix_folds_of, pivot, train
from serve_app.router import LearnedRouter
from tests.integration.test_evaluate import CODE, GERMAN, profile_table


@pytest.fixture()
def library(smoke_library, tmp_path):
    shutil.copytree(smoke_library.parent, tmp_path / "lib")
    return load_library(tmp_path / "lib" / "library.yaml")


def test_pivot_keeps_prompts_measured_on_every_expert(library):
    table = profile_table({"code": CODE[:3], "german": GERMAN[:2]})
    # Drop one row: that prompt is no longer measured on every expert.
    table = table.slice(1)
    matrix = pivot(table, library.names)
    assert len(matrix.ids) == 4
    assert matrix.losses.shape == (4, 4)
    with pytest.raises(ValueError, match="no loss for expert"):
        pivot(table, [*library.names, "other"])


def test_finetuning_tunes_and_saves_the_encoder_the_checkpoint_names(library, tmp_path):
    table = profile_table({"code": CODE, "german": GERMAN})
    out = tmp_path / "router"
    cfg = TrainConfig(mode="finetune", max_epochs=2, val_fraction=0.3, batch_size=8)
    report = train(library, table, out, cfg)
    assert report.mode == "finetune" and 1 <= report.epochs <= 2
    assert json.loads((out / "router.json").read_text())["encoder"] == "encoder"
    assert (out / "encoder" / "model.safetensors").is_file()
    router = LearnedRouter(str(out / "encoder"), out)
    (pred,) = router.predict([CODE[0]])
    assert set(pred) == set(library.names)


def test_an_unknown_mode_is_refused(library):
    with pytest.raises(ValueError, match="unknown training mode 'fast'"):
        train(library, profile_table({"code": CODE}), "unused", TrainConfig(mode="fast"))


def test_training_chooses_a_mix_on_validation_and_serving_applies_it(library, tmp_path):
    table = profile_table({"code": CODE, "german": GERMAN})
    out = tmp_path / "router"
    report = train(library, table, out, TrainConfig(max_epochs=20, val_fraction=0.3))
    meta = json.loads((out / "router.json").read_text())
    assert meta["domains"] == ["code", "german"]  # two domains: the head has a domain prior
    assert (meta["prior_weight"], meta["knn_weight"]) == (report.prior_weight, report.knn_weight)
    # Every setting tried is reported; the chosen one is the MLP alone or, among the settings
    # clearly better (by a standard error), the one with the lowest validation regret.
    alone = next(
        m for m in report.val_mixes if m["prior_weight"] == m["knn_weight"] == m["base_weight"] == 0
    )
    clear = [m for m in report.val_mixes if m["clear_of_mlp"]]
    best = min(m["regret"] for m in [alone, *clear])
    assert report.val["regret"] == pytest.approx(best)
    # 16 prompts are too few for folds of 20: the mix is chosen on the validation prompts.
    assert report.mix_folds == 0 and report.val["scored"] == report.n_val
    router = LearnedRouter(library.router.model, out)
    (pred,) = router.predict([CODE[0]])
    assert set(pred) == set(library.names)


def _many_prompts(extra: dict[str, str] | None = None) -> pa.Table:
    """48 prompts, each with losses of its own: three variants of every code and German text;
    `extra` (text -> domain) adds German-like prompts of other domains."""
    texts = {
        "code": [f"{t}\n# variant {v}" for t in CODE for v in range(3)],
        "german": [f"{t} (Fassung {v})" for t in GERMAN for v in range(3)],
    }
    rows = profile_table({**texts, "german": texts["german"] + list(extra or {})}).to_pylist()
    for i, row in enumerate(rows):
        row["loss"] += 0.05 * (i % 7)
        row["domain"] = (extra or {}).get(row["text"], row["domain"])
    return pa.Table.from_pylist(rows, schema=PROFILE_SCHEMA)


def test_with_enough_prompts_the_mix_is_chosen_out_of_fold_and_the_prior_sees_every_prompt(
    library, tmp_path
):
    table = _many_prompts()
    out = tmp_path / "router"
    report = train(library, table, out, TrainConfig(max_epochs=20, mix_folds=2))
    assert report.mix_folds == 2
    # The figures are out of fold over every prompt, and the winner is the setting that
    # choose_mix's rule picks among those tried on them.
    assert report.val["scored"] == report.n_train + report.n_val == 48
    alone = next(
        m for m in report.val_mixes if m["prior_weight"] == m["knn_weight"] == m["base_weight"] == 0
    )
    best = min(m["regret"] for m in [alone, *(m for m in report.val_mixes if m["clear_of_mlp"])])
    assert report.val["regret"] == pytest.approx(best)
    # The domain prior's means are every prompt's, validation prompts included.
    matrix = pivot(table, library.names)
    head = LearnedRouter(library.router.model, out).head
    for row, domain in enumerate(head.cfg.domains):
        mine = matrix.losses[np.array(matrix.domains) == domain]
        np.testing.assert_allclose(head.domain_means[row].numpy(), mine.mean(0), rtol=1e-5)
    assert report.val_oracle["regret"] == 0


def test_with_validation_by_source_the_mix_folds_hold_out_whole_sources(library, tmp_path):
    poem = "Ein Gedicht über den Herbst."
    table = _many_prompts({poem: "poetry"})
    matrix = pivot(table, library.names)
    # A text's three variants share a source; the poem is its domain's only source.
    groups = {
        i: t.split("\n# variant")[0].split(" (Fassung")[0]
        for i, t in zip(matrix.ids, matrix.texts, strict=True)
    }
    cfg = TrainConfig(max_epochs=20, mix_folds=2, group_by="source")
    fold = mix_folds_of(matrix, cfg, [groups[i] for i in matrix.ids])
    folds_of_source: dict[str, set] = {}
    for i, f in zip(matrix.ids, fold, strict=True):
        folds_of_source.setdefault(groups[i], set()).add(int(f))
    assert all(len(f) == 1 for f in folds_of_source.values()), "a source split across folds"
    assert folds_of_source[poem] == {-1}  # a domain of one source is never held out
    assert set(fold[fold >= 0]) == {0, 1}
    report = train(library, table, tmp_path / "router", cfg, groups=groups)
    assert report.mix_folds == 2 and report.group_by == "source"
    assert report.val["scored"] == 48  # out of fold: every prompt but the poem
    # Too few prompts for three folds of 20: the mix is chosen on the one validation draw.
    few = replace(cfg, mix_folds=3)
    assert mix_folds_of(matrix, few, [groups[i] for i in matrix.ids]) is None


def test_a_domain_whose_prompts_all_validate_does_not_stop_the_prior_s_refit(library, tmp_path):
    # One prompt of a third domain, drawn into validation: the MLP's training prompts, and so
    # the head's domains, lack it; the prior fit on every prompt leaves it out.
    text = next(
        t
        for t in (f"Ein Gedicht über den Herbst, Nummer {i}." for i in range(100))
        if in_split(prompt_id(t), 0.2)
    )
    report = train(
        library, _many_prompts({text: "poetry"}), tmp_path / "router", TrainConfig(mix_folds=2)
    )
    assert report.mix_folds == 2 and report.val["scored"] == 49
    head = LearnedRouter(library.router.model, tmp_path / "router").head
    assert head.cfg.domains == ["code", "german"]


def test_tryage_train_passes_mix_folds(library, tmp_path):
    pq.write_table(_many_prompts(), tmp_path / "profile.parquet")
    for folds in ("2", "0"):
        out = tmp_path / f"router-{folds}"
        lib = tmp_path / "lib" / "library.yaml"  # the fixture's copy
        args = ["train", "--library", str(lib), "--profile", str(tmp_path / "profile.parquet")]
        args += ["--out", str(out), "--max-epochs", "20", "--mix-folds", folds]
        assert main(args) == 0
        assert json.loads((out / "report.json").read_text())["mix_folds"] == int(folds)
