"""Evaluation and the Pareto sweep on a hand-made profile whose answers are known."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pyarrow as pa
import pytest
import yaml

from serve_app.config import load_library
from serve_app.learn.data import prompt_id
from serve_app.learn.evaluate import evaluate
from serve_app.learn.pareto import calibration, plot, sweep, write_csv
from serve_app.learn.profile import PROFILE_SCHEMA
from serve_app.learn.train import TrainConfig, train

CODE = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "for i in range(10):\n    print(i * i)",
    "class Stack:\n    def __init__(self):\n        self.items = []",
    "import os\nfiles = [f for f in os.listdir('.') if f.endswith('.py')]",
    'public static void main(String[] args) { System.out.println("hi"); }',
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); return 0; }',
    'fn main() { let v: Vec<i32> = (0..5).collect(); println!("{:?}", v); }',
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
]
GERMAN = [
    "Die Bundesregierung hat am Mittwoch ein neues Klimaschutzgesetz beschlossen.",
    "Der Wiener Gemeinderat diskutierte gestern über die Mietpreise in der Stadt.",
    "Nach dem Spiel sagte der Trainer, die Mannschaft habe großartig gekämpft.",
    "Die Inflation in Österreich ist im Oktober leicht gesunken, meldet die Statistik.",
    "Im Museum wird ab Freitag eine Ausstellung über moderne Malerei gezeigt.",
    "Die Polizei sucht Zeugen eines Unfalls auf der Autobahn bei Salzburg.",
    "Forscher der Universität haben ein neues Verfahren zur Wasserreinigung entwickelt.",
    "Der Schnee hat in den Alpen zu zahlreichen Straßensperren geführt.",
]
# True losses (bits per byte) by domain: gen-s is the code expert, gen-m the German one.
LOSSES = {
    "code": {"gen-xs": 2.0, "gen-s": 1.0, "gen-m": 1.5, "mask-s": 3.0},
    "german": {"gen-xs": 2.0, "gen-s": 2.5, "gen-m": 1.2, "mask-s": 3.0},
}
CARDS = {
    "gen-xs": "Cooking recipes, ingredients and kitchen tips.",
    "gen-s": "Programming source code: Python, Java, C, Rust functions and SQL database queries.",
    "gen-m": "Deutsche Nachrichten: German-language news articles about politics and society.",
    "mask-s": "Football results, sports scores and match reports.",
}


def profile_table(texts_by_domain: dict[str, list[str]]) -> pa.Table:
    rows = []
    for domain, texts in texts_by_domain.items():
        for text in texts:
            for expert, loss in LOSSES[domain].items():
                rows.append(
                    {
                        "prompt_id": prompt_id(text),
                        "text": text,
                        "domain": domain,
                        "expert": expert,
                        "loss": loss,
                        "bytes": len(text.encode()),
                        "tokens": len(text.split()),
                        "seconds": 0.01,
                        "output": None,
                    }
                )
    return pa.Table.from_pylist(rows, schema=PROFILE_SCHEMA)


@pytest.fixture(scope="module")
def trained(smoke_library, tmp_path_factory):
    """The smoke library with domain model cards and a router trained on the hand-made
    profile of the first six texts of each domain."""
    folder = tmp_path_factory.mktemp("lib")
    shutil.copytree(smoke_library.parent, folder, dirs_exist_ok=True)
    raw = yaml.safe_load((folder / "library.yaml").read_text())
    for expert in raw["experts"]:
        expert["description"] = CARDS[expert["name"]]
    (folder / "library.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    library = load_library(folder / "library.yaml")
    table = profile_table({"code": CODE[:6], "german": GERMAN[:6]})
    report = train(library, table, folder / "router", TrainConfig(val_fraction=0.3))
    return load_library(folder / "library.yaml"), report


@pytest.fixture(scope="module")
def evaluated(trained):
    library, _ = trained
    return evaluate(library, profile_table({"code": CODE[6:], "german": GERMAN[6:]}), k=3)


def test_training_beats_the_untrained_head(trained):
    _, report = trained
    assert report.n_train + report.n_val == 12
    assert report.val_error < report.untrained_val_error


def test_evaluate_reports_every_baseline_with_the_known_answers(evaluated):
    result, _, _ = evaluated
    out = result.as_json()
    assert out["n"] == 4
    assert out["experts"] == ["gen-xs", "gen-s", "gen-m", "mask-s"]
    b = out["baselines"]
    assert set(b) == {"oracle", "random", "best_single", "model_card", "knn"}
    assert b["oracle"] == pytest.approx({"top1": 1.0, "regret": 0.0, "mean_loss": 1.1, "scored": 4})
    # Training means: gen-m (1.5 + 1.2) / 2 beats gen-s (1.0 + 2.5) / 2: right on German only.
    assert b["best_single"] == pytest.approx(
        {"top1": 0.5, "regret": 0.25, "mean_loss": 1.35, "scored": 4}
    )
    # A uniform pick: code regrets (1, 0, .5, 2) / 4, German (.8, 1.3, 0, 1.8) / 4.
    assert b["random"] == pytest.approx(
        {"top1": 0.25, "regret": 0.925, "mean_loss": 2.025, "scored": 4}
    )
    # The nearest training prompts and the closest model card are of the prompt's domain.
    assert b["knn"] == pytest.approx({"top1": 1.0, "regret": 0.0, "mean_loss": 1.1, "scored": 4})
    assert b["model_card"] == pytest.approx(
        {"top1": 1.0, "regret": 0.0, "mean_loss": 1.1, "scored": 4}
    )
    # Twelve training prompts: the learned router must beat chance and the single best expert.
    assert out["router"]["top1"] >= b["best_single"]["top1"] > b["random"]["top1"]
    assert out["router"]["regret"] < b["random"]["regret"]
    code = out["per_domain"]["code"]
    assert code["n"] == 2
    assert code["best_single_top1"] == 0.0
    assert code["best_single_regret"] == pytest.approx(0.5)
    assert out["per_domain"]["german"]["best_single_top1"] == 1.0


def test_the_table_shows_every_method_and_domain(evaluated):
    text = evaluated[0].table()
    for word in ("router", "oracle", "random", "best_single", "model_card", "knn", "german"):
        assert word in text


def test_pareto_at_weight_zero_is_what_evaluate_reports(trained, evaluated, tmp_path):
    library, _ = trained
    result, scores, truth = evaluated
    points = sweep(library, scores["router"], truth, "size", (0.0, 0.5, 100.0))
    zero = points[0]
    assert zero.kind == "router" and zero.weight == 0.0
    assert zero.mean_loss == pytest.approx(result.router["mean_loss"])
    assert zero.top1 == pytest.approx(result.router["top1"])
    assert zero.regret == pytest.approx(result.router["regret"])
    # A huge size weight always picks the smallest expert.
    smallest = min(library.experts, key=lambda e: e.params)
    assert points[2].mean_params == smallest.params
    assert points[2].mean_penalty == 0.0
    experts = {p.label: p for p in points if p.kind == "expert"}
    assert set(experts) == set(truth.experts)
    # mask-s: the worst loss, and no smaller than gen-s: dominated.
    assert not experts["mask-s"].pareto
    assert zero.pareto
    write_csv(points, tmp_path / "pareto.csv")
    plot(points, "size", tmp_path / "pareto.png")
    rows = list(csv.DictReader((tmp_path / "pareto.csv").open()))
    assert len(rows) == 3 + 4
    assert float(rows[0]["mean_loss"]) == pytest.approx(zero.mean_loss)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = calibration(points, "size")
    # 0 and 0.5 choose the same experts: one line. 100 keeps less at fewer parameters.
    assert lines[0].startswith("size 0-0.5 keeps 100% of the quality")
    kept = points[2]
    share = kept.mean_params / zero.mean_params
    assert lines[1].startswith("size 100 keeps ")
    assert lines[1].endswith(f"at {share:.0%} of the parameters")
    assert lines[2].startswith("(quality: 100% = the router at size 0")


def test_a_weight_without_measurements_is_refused(trained, evaluated):
    library, _ = trained
    _, scores, truth = evaluated
    with pytest.raises(ValueError, match="needs a measured verbosity"):
        sweep(library, scores["router"], truth, "verbosity")


def test_scores_are_per_prompt_and_expert(evaluated):
    _, scores, truth = evaluated
    for name, s in scores.items():
        assert s.shape == (4, 4), name
    assert np.array_equal(scores["oracle"], truth.losses)
