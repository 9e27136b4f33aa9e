"""The routing benchmark's page, goal and helpers, on hand-made figures."""

from __future__ import annotations

import copy

import pytest

from bench import routing

METHODS = ("router", "oracle", "random", "best_single", "model_card", "knn")


def figures(top1: float, regret: float) -> dict[str, float]:
    return {"top1": top1, "regret": regret, "mean_loss": 2.0 + regret}


def results() -> dict:
    """A results dict as bench.routing writes it: two domains, four experts."""
    overall = {
        "router": figures(0.80, 0.010),
        "oracle": figures(1.0, 0.0),
        "random": figures(0.25, 0.20),
        "best_single": figures(0.40, 0.10),
        "model_card": figures(0.50, 0.08),
        "knn": figures(0.70, 0.03),
    }
    per_domain = {}
    for domain, shift in (("code", 0.0), ("legal", 0.05)):
        row: dict[str, float] = {"n": 30}
        for name, f in overall.items():
            for metric, value in f.items():
                row[f"{name}_{metric}"] = value - shift if metric == "top1" else value
        per_domain[domain] = row
    return {
        "date": "2025-01-02T03:04:05+00:00",
        "machine": {
            "platform": "Linux-test",
            "python": "3.11.7",
            "cpus": 2,
            "torch": "2.13.0",
            "ray": "2.60.0",
            "device": "cpu",
            "load_average_1m": 0.5,
        },
        "command": "python -m bench.routing",
        "corpus": "../shared/corpora",
        "preset": "default",
        "library": "libraries/corpora/library.yaml",
        "per_domain": 60,
        "domains": ["code", "legal"],
        "split": {
            "lm": {"code": 100, "legal": 90},
            "router": {"code": 30, "legal": 25},
            "heldout": {"code": 30, "legal": 30},
        },
        "build": {
            "seconds": {"split": 1.0, "expert-general-s": 60.0, "profile": 0.0},
            "this_run_s": 61.0,
            "from_earlier_run": [],
            "wall_s": 62.0,
        },
        "evaluate_s": 30.0,
        "truth_rows": {"measured": 3300, "reused": 0},
        "pareto_s": 5.0,
        "evaluate": {
            "n": 60,
            "experts": ["general-s", "general-l", "code-s", "legal-s"],
            "router": overall["router"],
            "baselines": {k: v for k, v in overall.items() if k != "router"},
            "per_domain": per_domain,
        },
        "pareto": {
            "weight": "size",
            "calibration": ["size 0 keeps 100% of the quality", "(quality: ...)"],
            "non_dominated": ["size=0", "size=0.5-10"],
            "png": routing.PNG,
            "csv": routing.CSV,
        },
        "experts": [
            {"name": n, "domain": d, "params": p, "released": "2024-01-15"}
            for n, d, p in (
                ("general-s", None, 1000),
                ("general-l", None, 5000),
                ("code-s", "code", 1000),
                ("legal-s", "legal", 1000),
            )
        ],
        "heldout_bpb": {
            "general-s": {"code": 2.5, "legal": 2.4},
            "general-l": {"code": 2.3, "legal": 2.2},
            "code-s": {"code": 2.0, "legal": 2.6},
            "legal-s": {"code": 2.7, "legal": 1.9},
        },
    }


def test_the_page_has_every_table():
    page = routing.render(results())
    assert page.startswith("# Routing benchmark")
    assert "2025-01-02T03:04:05+00:00" in page and "Linux-test, 2 CPUs" in page
    assert "```bash\npython -m bench.routing\n```" in page
    assert "| router | 0.800 | 0.0100 | 2.0100 |" not in page  # the router's name is bold
    assert "| **router** | 0.800 | 0.0100 | 2.0100 |" in page
    for name in METHODS[1:]:
        assert f"\n| {name} | " in page
    # split, top-1 and regret by domain; the best but the oracle in bold
    assert "| code | 100 | 30 | 30 |" in page and "| all | 190 | 55 | 60 |" in page
    assert "| code | 30 | **0.800** | 0.250 | 0.400 | 0.500 | 0.700 |" in page
    assert "| legal | 30 | **0.0100** | 0.2000 | 0.1000 | 0.0800 | 0.0300 |" in page
    # the experts' losses, the best on each domain in bold
    assert "| code-s | 1,000 | **2.000** | 2.600 |" in page
    assert "| profile | 0.0 (skipped) |" in page
    assert "Evaluate 30 s (every expert run on every prompt included), pareto 5 s" in page
    assert "![Pareto front: loss against size](routing-pareto-size.png)" in page
    assert "[table](routing-pareto-size.csv)" in page
    assert "- size 0 keeps 100% of the quality\n" in page
    assert "Non-dominated: size=0, size=0.5-10." in page


def test_the_goal_is_met_when_the_router_is_well_above_and_its_regret_small():
    page = routing.render(results())
    assert "**Met.**" in page
    assert "+0.100 over the closest baseline (knn)" in page
    assert "10% of best_single's 0.1000" in page


@pytest.mark.parametrize(
    ("method", "metric", "value", "why"),
    [
        ("knn", "top1", 0.78, "+0.020 over the closest baseline (knn) — not met"),
        ("router", "regret", 0.03, "30% of best_single's 0.1000 — not met"),
    ],
)
def test_the_goal_is_not_met_when_either_half_fails(method, metric, value, why):
    r = results()
    target = r["evaluate"]["router"] if method == "router" else r["evaluate"]["baselines"][method]
    target[metric] = value
    page = routing.render(r)
    assert "**Not met.**" in page and why in page
    assert routing.goal(r["evaluate"])["met"] is False


def test_a_resumed_run_keeps_the_times_of_the_steps_an_earlier_run_did():
    earlier = {"build": {"seconds": {"split": 1.0, "expert-general-s": 60.0, "profile": 0.0}}}
    now = {"split": 0.0, "expert-general-s": 0.0, "profile": 40.0, "router": 9.0}
    build = routing._build_seconds(now, earlier)
    assert build["seconds"] == {
        "split": 1.0,
        "expert-general-s": 60.0,
        "profile": 40.0,
        "router": 9.0,
    }
    assert build["from_earlier_run"] == ["expert-general-s", "split"]
    assert build["this_run_s"] == 49.0
    r = results()
    r["build"] = {**build, "wall_s": 50.0}
    assert "| split | 1.0 (an earlier run) |" in routing.render(r)
    assert routing._build_seconds(now, None)["seconds"] == now


def test_non_dominated_sweep_values_with_one_outcome_are_one_range():
    def row(label, weight, loss, pen, pareto, kind="router"):
        return {
            "kind": kind,
            "label": label,
            "weight": weight,
            "mean_loss": loss,
            "mean_penalty": pen,
            "pareto": str(pareto),
        }

    rows = [
        row("size=0", "0.0", "2.0", "0.5", True),
        row("size=0.1", "0.1", "2.1", "0.1", True),
        row("size=0.2", "0.2", "2.1", "0.1", True),
        row("size=0.5", "0.5", "2.1", "0.1", True),
        row("size=1", "1.0", "2.3", "0.1", False),
        row("size=2", "2.0", "2.1", "0.1", True),
        row("general-s", "", "2.5", "0.0", True, kind="expert"),
    ]
    assert routing.non_dominated(rows) == ["size=0", "size=0.1-0.5", "size=2", "general-s"]


def test_a_missing_corpus_fails_with_a_message(tmp_path, capsys):
    argv = ["--corpus", str(tmp_path / "nope"), "--results", str(tmp_path / "r.json")]
    assert routing.main(argv) == 2
    err = capsys.readouterr().err
    assert f"no corpus folder at {tmp_path / 'nope'}; pass --corpus DIR" in err
    assert not (tmp_path / "r.json").exists()


def test_true_losses_read_back_are_said_so():
    r = results()
    assert "Evaluate 30 s (every expert run on every prompt included)" in routing.render(r)
    r["truth_rows"] = {"measured": 0, "reused": 3300}
    said = "Evaluate 30 s (the true losses read from earlier profiles with the same expert weights)"
    assert said in routing.render(r)
    r["truth_rows"] = {"measured": 300, "reused": 3000}
    assert "(300 of 3300 true losses measured now, the rest read from" in routing.render(r)
    del r["truth_rows"]  # results written before runs recorded it
    assert "Evaluate 30 s (whether the true losses were measured now or read back was not" in (
        routing.render(r)
    )


def test_render_does_not_change_its_input():
    r = results()
    before = copy.deepcopy(r)
    routing.render(r)
    assert r == before
