"""The routing benchmark end to end: a tiny demo library built from this machine's own text (the
harvest, so it runs without ../shared), evaluated on its held-out split, swept by size; the
page, the results and the plot. Ray is the session's local instance."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from bench import routing
from serve_app.demo.harvest import DOMAINS, harvest
from serve_app.learn.evaluate import BASELINES

# About a minute (a tiny demo build, evaluation and a sweep): left out of the default run,
# whose parts (the build, evaluate, pareto) other modules test; `pytest -m slow` runs it.
pytestmark = pytest.mark.slow

PER_DOMAIN = 8  # held-out prompts per domain: enough for every table, quick to profile


@pytest.fixture(scope="module")
def ran(serve_port, tmp_path_factory):
    """Run the benchmark once; its folder and what it printed."""
    tmp = tmp_path_factory.mktemp("bench-routing")
    # The corpus `tryage demo build --preset tiny` harvests itself (test_demo builds from it).
    harvest(tmp / "corpus", max_docs=120, progress=False)
    argv = [
        *("--corpus", str(tmp / "corpus"), "--out", str(tmp / "lib"), "--preset", "tiny"),
        *("--per-domain", str(PER_DOMAIN), "--docs", str(tmp / "docs")),
        *("--results", str(tmp / "routing.json"), "--quiet"),
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert routing.main(argv) == 0
    return tmp, out.getvalue()


def test_the_results_hold_the_evaluate_contract_and_the_run(ran):
    tmp, _ = ran
    results = json.loads((tmp / "routing.json").read_text())
    ev = results["evaluate"]
    assert set(ev) == {"n", "experts", "measure", "router", "baselines", "per_domain"}
    assert set(ev["baselines"]) == set(BASELINES)
    for figures in (ev["router"], *ev["baselines"].values()):
        assert set(figures) == {"top1", "regret", "mean_loss", "scored"}
    assert ev["baselines"]["oracle"]["top1"] == 1.0 and ev["baselines"]["oracle"]["regret"] == 0
    # PER_DOMAIN held-out documents a domain, nothing else.
    heldout = results["split"]["heldout"]
    assert set(ev["per_domain"]) == set(DOMAINS)
    assert ev["n"] == sum(min(PER_DOMAIN, n) for n in heldout.values())
    for domain, row in ev["per_domain"].items():
        assert row["n"] == min(PER_DOMAIN, heldout[domain])
        assert 0 <= row["router_top1"] <= 1 and row["router_regret"] >= 0
    assert set(ev["experts"]) == {"general-s", "general-l", *(f"{d}-s" for d in DOMAINS)}
    assert results["preset"] == "tiny" and results["machine"]["cpus"] >= 1
    assert results["build"]["seconds"]["expert-general-s"] > 0
    # weight 0 (alone, or in a run of values that choose alike) is the router itself: 100%
    assert re.match(
        r"size 0(-[\d.]+)? keeps 100% of the quality", results["pareto"]["calibration"][0]
    )
    assert results["goal"]["met"] == (results["goal"]["top1_met"] and results["goal"]["regret_met"])


def test_the_page_has_the_tables_the_goal_and_the_plot(ran):
    tmp, printed = ran
    page = (tmp / "docs" / "routing-benchmark.md").read_text()
    results = json.loads((tmp / "routing.json").read_text())
    assert page == routing.render(results)
    assert "| method | top-1 | regret (bits/byte) | mean loss (bits/byte) |" in page
    for name in BASELINES:
        assert f"\n| {name} | " in page
    before, rest = page.split("\n## On sources the router never saw", 1)
    grouped, per_domain = rest.split("\n## Per domain", 1)
    for domain in DOMAINS:
        assert before.count(f"\n| {domain} | ") == 1  # the split table
        # per domain on unseen sources, and on new sources of known domains where it has two
        assert grouped.count(f"\n| {domain} | ") in (1, 2)
        assert per_domain.split("\n## ", 1)[0].count(f"\n| {domain} | ") == 2  # top-1, regret
    assert "| code-s | " in page  # the experts' held-out losses
    verdict = "**Met.**" if results["goal"]["met"] else "**Not met.**"
    assert verdict in page
    assert "![Pareto front: loss against size](routing-pareto-size.png)" in page
    png = tmp / "docs" / "routing-pareto-size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp / "docs" / "routing-pareto-size.csv").read_text().startswith("kind,label,")
    # The overall table, printed
    assert f"| knn | {results['evaluate']['baselines']['knn']['top1']:.3f} |" in printed
