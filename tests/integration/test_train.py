"""Training modes on the hand-made profile of test_evaluate."""

from __future__ import annotations

import json
import shutil

import pytest

from serve_app.config import load_library
from serve_app.learn.train import TrainConfig, pivot, train
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
    router = LearnedRouter(library.router.model, out)
    (pred,) = router.predict([CODE[0]])
    assert set(pred) == set(library.names)
