"""tryage scores import: RouterDC, RouterBench and JSONL scores into a profile and a library."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from serve_app.config import load_library
from serve_app.learn.data import DataError
from serve_app.learn.matrix import measure_of, pivot
from serve_app.learn.profile import read_profile
from serve_app.learn.scores import import_scores
from serve_app.learn.train import TrainConfig, train_head


def _routerdc(tmp_path):
    (tmp_path / "mmlu.json").write_text(
        json.dumps(
            [
                {"question": "Q1? A. x B. y", "scores": {"org/Model-A": 0.73, "org/model_b": 0}},
                {"question": "Q2? A. x B. y", "scores": {"org/Model-A": 0, "org/model_b": 0.41}},
            ]
        )
    )
    (tmp_path / "gsm8k.json").write_text(
        json.dumps([{"question": "2+2?", "scores": {"org/Model-A": 0.3, "org/model_b": 1.0}}])
    )
    return [tmp_path / "mmlu.json", tmp_path / "gsm8k.json"]


def test_routerdc_counts_like_routerdc_and_writes_a_loadable_library(tmp_path):
    result = import_scores("routerdc", _routerdc(tmp_path), tmp_path / "out")
    table = read_profile(result.profile)
    assert measure_of(table).higher_is_better and measure_of(table).name == "accuracy"
    rows = {(r["text"], r["expert"]): r["score"] for r in table.to_pylist()}
    # Multiple choice: correct exactly when the score is > 0; generation: the share as it is.
    assert rows[("Q1? A. x B. y", "model-a")] == 1.0
    assert rows[("Q1? A. x B. y", "model-b")] == 0.0
    assert rows[("2+2?", "model-a")] == 0.3
    assert {r["domain"] for r in table.to_pylist()} == {"mmlu", "gsm8k"}
    library = load_library(result.library, router=False)
    assert library.names == ["model-a", "model-b"]
    assert all(e.engine == "openai" and e.base_url for e in library.experts)
    assert library.expert("model-a").model == "org/Model-A"
    # The matrix holds losses: a score negated, so the lowest is best everywhere downstream.
    m = pivot(table, library.names)
    q1 = m.ids.index(next(i for i, t in zip(m.ids, m.texts, strict=True) if t.startswith("Q1")))
    assert m.losses[q1].tolist() == [-1.0, -0.0]
    assert m.measure.shown(m.losses[q1, 0]) == 1.0


def test_routerbench_keeps_gaps_missing_and_costs_per_prompt(tmp_path):
    csv = tmp_path / "rb.csv"
    csv.write_text(
        "sample_id,prompt,eval_name,gpt-x,llama-y,gpt-x|model_response,gpt-x|total_cost,"
        "llama-y|model_response,llama-y|total_cost\n"
        'a.1,"What is 2+2, really?",arc-challenge,1.0,,four,0.002,,0.0001\n'
        "a.2,Name a colour.,mmlu-x,0.0,1.0,red,0.001,blue,0.0002\n"
    )
    result = import_scores("routerbench", [csv], tmp_path / "out")
    assert result.missing == 1
    table = read_profile(result.profile)
    m = pivot(table, ["gpt-x", "llama-y"], complete=False)
    first = m.texts.index("What is 2+2, really?")
    assert math.isnan(m.losses[first, 1])  # empty cell: missing, not zero
    assert m.losses[first, 0] == -1.0
    assert m.costs[first].tolist() == [0.002, 0.0001]
    # complete=True keeps only prompts every expert answered.
    assert pivot(table, ["gpt-x", "llama-y"]).texts == ["Name a colour."]
    library = load_library(result.library, router=False)
    prices = {e.name: e.price.input_per_mtok for e in library.experts}
    assert prices["gpt-x"] > prices["llama-y"] > 0


def test_jsonl_losses_and_default_domains(tmp_path):
    f = tmp_path / "evals.jsonl"
    f.write_text(
        '{"text": "hello", "model": "m1", "score": 2.5}\n'
        '{"text": "hello", "model": "m2", "score": 1.5, "domain": "greet"}\n'
    )
    result = import_scores("jsonl", [f], tmp_path / "out", lower_is_better=True)
    table = read_profile(result.profile)
    assert not measure_of(table).higher_is_better
    m = pivot(table, ["m1", "m2"])
    assert m.losses.tolist() == [[2.5, 1.5]]
    assert m.domains == ["evals"]  # the prompt's first row has no domain: the file's name


@pytest.mark.parametrize(
    ("fmt", "body", "message"),
    [
        ("jsonl", '{"text": "x", "score": 1}\n', "a row needs a string 'model'"),
        ("jsonl", '{"text": "x", "model": "m", "score": "high"}\n', "is not a JSON number"),
        (
            "jsonl",
            '{"text": "x", "model": "m", "score": "0.3"}\n',
            'bad.txt:1: score: "0.3" is not',
        ),
        ("jsonl", '{"text": "x", "model": "m", "score": true}\n', "true is not a JSON number"),
        ("jsonl", '{"text": "x", "model": "m", "score": NaN}\n', "NaN is not JSON"),
        ("jsonl", '{"text": "x", "model": "m", "scroe": 0.3}\n', "a row needs a 'score'"),
        ("jsonl", '{"text": "x", "model": "m", "score": 1, "domain": 5}\n', "'domain' must be"),
        ("jsonl", '{"text": " ", "model": "m", "score": 1}\n', "bad.txt:1: 'text' is empty"),
        ("jsonl", '{"text": "x", "model": "m", "score": 1, "cost": -5}\n', "cannot be negative"),
        ("jsonl", '{"text": "x", "model": "m", "score": 1e999}\n', "not a finite number"),
        ("jsonl", '{"text": "x", "model": "m", "score": 1' + "0" * 400 + "}\n", "not a finite"),
        (
            "jsonl",
            '{"text": "x", "model": "m", "score": 1}\n{"text": "x", "model": "m", "score": 0}\n',
            "bad.txt:2: 'm' on this text was already measured at .*bad.txt:1",
        ),
        ("routerbench", "prompt,eval_name,m,m|total_cost\nhi,t,1,-0.5\n", "cannot be negative"),
        ("jsonl", "not json\n", "not JSON"),
        ("routerdc", '{"question": "x"}', "expected a JSON list"),
        ("routerbench", "a,b\n1,2\n", "not a RouterBench CSV"),
    ],
)
def test_bad_files_name_the_file_and_row(tmp_path, fmt, body, message):
    f = tmp_path / "bad.txt"
    f.write_text(body)
    with pytest.raises(DataError, match=message):
        import_scores(fmt, [f], tmp_path / "out")


def test_training_and_its_report_judge_every_method_on_the_same_prompts(tmp_path):
    # With gaps, a choice of an expert never measured on a prompt would drop that prompt
    # from the router's figures and not from the oracle's: the router could look better.
    from serve_app.learn.train import TrainConfig, train

    rows = []
    for i in range(60):
        text = f"{'proof' if i % 2 else 'sum'} number {i}"
        for model in ("a", "b", "c"):
            missing = model == "c" and i % 3 == 0
            rows.append(
                {
                    "text": text,
                    "model": model,
                    "score": None if missing else (i * 7 + ord(model)) % 5 / 4,
                }
            )
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = import_scores("jsonl", [f], tmp_path / "lib")
    library = load_library(result.library, router=False)
    report = train(
        library,
        read_profile(result.profile),
        tmp_path / "lib" / "router",
        TrainConfig(max_epochs=3),
    )
    n = {report.val["scored"], report.val_best_single["scored"], report.val_oracle["scored"]}
    assert len(n) == 1, report
    assert report.val["mean_loss"] >= report.val_oracle["mean_loss"] - 1e-12


def test_an_import_says_how_many_scored_pairs_have_no_cost(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(
        '{"text": "x", "model": "m", "score": 1, "cost": 0.1}\n'
        '{"text": "y", "model": "m", "score": 0}\n'
        '{"text": "z", "model": "m", "score": null}\n'
    )
    got = import_scores("jsonl", [f], tmp_path / "out")
    assert got.missing_costs == 1 and "1 scored pair(s) without a cost" in got.table()


def test_a_pair_repeated_with_the_same_measurement_or_in_a_benchmark_keeps_one(tmp_path):
    same = tmp_path / "mine.jsonl"
    row = '{"text": "x", "model": "m", "score": 1}\n'
    same.write_text(row + row + '{"text": "y", "model": "m", "score": null}\n')
    mine = import_scores("jsonl", [same], tmp_path / "a")
    assert (mine.prompts, mine.missing, mine.repeated) == (2, 1, 1)
    # RouterDC repeats a few questions: the last measurement is kept, and counted.
    dc = tmp_path / "mmlu.json"
    q = {"question": "Q? A. x B. y", "scores": {"m": 0.5}}
    dc.write_text(json.dumps([q, {**q, "scores": {"m": 0}}]))
    bench = import_scores("routerdc", [dc], tmp_path / "b")
    assert bench.repeated == 1 and "1 repeated (prompt, model) pair(s)" in bench.table()
    assert pivot(read_profile(bench.profile), ["m"]).losses.tolist() == [[-0.0]]


def test_training_skips_missing_scores():
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    y = rng.normal(size=(64, 3))
    y[::3, 1] = np.nan  # a third of expert 1's scores were never measured
    head, epochs, err, _ = train_head(
        emb[:48], y[:48], emb[48:], y[48:], ["a", "b", "c"], TrainConfig(max_epochs=5, hidden=8)
    )
    assert epochs == 5 and math.isfinite(err)
    assert all(torch.isfinite(p).all() for p in head.parameters())


def test_pareto_on_imported_costs_trades_quality_for_measured_cost(tmp_path, capsys):
    """A RouterBench-style import with per-prompt costs: `tryage pareto --weight cost` draws
    quality against the measured cost of the chosen answers, with no model run here."""
    from serve_app.cli import main

    lines = ["sample_id,prompt,eval_name,big,small,big|total_cost,small|total_cost"]
    for i in range(40):
        hard = i % 2 == 0  # the big model is right on hard prompts, both on easy ones
        task = "Prove a theorem about primes" if hard else "Add 2 and 3"
        text = f'"{task}, item {i}"'  # quoted: the comma is part of the prompt
        small = "" if i == 39 else (0.0 if hard else 1.0)  # gaps, left out of the front:
        cost = "" if i == 37 else 0.001  # a score without its cost too, for the cost front
        lines.append(f"s{i},{text},{'proofs' if hard else 'sums'},1.0,{small},0.01,{cost}")
    csv = tmp_path / "rb.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "lib"
    assert main(["scores", "import", "--format", "routerbench", str(csv), "--out", str(out)]) == 0
    lib, profile = str(out / "library.yaml"), str(out / "profile.parquet")
    assert main(["train", "--library", lib, "--profile", profile, "--max-epochs", "20"]) == 0
    sweep = tmp_path / "sweep"
    args = [
        "pareto",
        "--library",
        lib,
        "--profile",
        profile,
        "--weight",
        "cost",
        "--out",
        str(sweep),
    ]
    # Every prompt trained the router: say how to evaluate anyway.
    assert main(args) == 2
    assert "--include-trained" in capsys.readouterr().err
    assert main([*args, "--include-trained", "--values", "0", "100"]) == 0
    rows = list(__import__("csv").DictReader((sweep / "pareto.csv").open()))
    router = {float(r["weight"]): r for r in rows if r["kind"] == "router"}
    # At weight 0 the router pays for the big model where it is needed; at 100 it always
    # takes the cheap one: lower measured cost, lower accuracy (a score: higher is better).
    assert float(router[100]["mean_cost"]) == pytest.approx(0.001)
    assert float(router[0]["mean_cost"]) > float(router[100]["mean_cost"])
    assert float(router[0]["mean_score"]) > float(router[100]["mean_score"])
    assert "mean_loss" not in rows[0]
    # Every point on the same 38 prompts: those without the small model's score or cost are out.
    assert {r["prompts"] for r in rows} == {"38"}
    assert (sweep / "pareto.png").stat().st_size > 0
    text = (sweep / "calibration.txt").read_text()
    assert "of the cost" in text and "2 of 40 left out: 1 without every expert's score, 1 " in text
    # `tryage route` on a router of scores gives each prediction as a score too.
    data, routed = tmp_path / "p.jsonl", tmp_path / "routed.jsonl"
    data.write_text('{"text": "Add 4 and 5", "domain": "sums"}\n{"text": "[flag: x] hi"}\n')
    route = ["route", "--library", lib, "--data", str(data), "--out", str(routed)]
    assert main([*route, "--weight", "cost=2"]) == 0
    good, refused = (json.loads(line) for line in routed.read_text().splitlines())
    assert {r["expert"] for r in good["ranking"]} == {"big", "small"}
    for r in good["ranking"]:
        assert r["predicted_score"] == pytest.approx(-r["predicted_loss"])
        assert r["penalties"] == {"cost": pytest.approx(r["penalty"])}  # the one weight set
    assert good["ranking"][0]["penalties"]["cost"] < good["ranking"][1]["penalties"]["cost"]
    assert refused["expert"] is None and refused["ranking"] is None
