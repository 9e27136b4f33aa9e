"""The RouterDC benchmark's scoring: RouterDC's definition of accuracy, and its standard errors."""

from __future__ import annotations

import numpy as np
import pytest

from bench.routerdc import TABLE1, accuracy, counts, headline, headline_se


def test_counts_follow_routerdc_multiple_choice_counts_a_positive_score_others_their_share():
    rows = {
        "mmlu": [{"scores": {"a": 0.4, "b": 0.0}}, {"scores": {"a": 0.0, "b": 1.0}}],
        "gsm8k": [{"scores": {"a": 0.25, "b": 1.0}}],
    }
    got = counts(rows, {"mmlu": ["a", "a"], "gsm8k": ["a"]})
    assert got["mmlu"].tolist() == [1.0, 0.0]
    assert got["gsm8k"].tolist() == [0.25]
    assert accuracy(got) == {"mmlu": 50.0, "gsm8k": 25.0}


def test_the_headline_s_standard_error_averages_the_tasks_like_the_headline():
    rng = np.random.default_rng(0)
    values = {t: rng.integers(0, 2, size=40 + 10 * i).astype(float) for i, t in enumerate(TABLE1)}
    se = {t: np.std(v, ddof=1) / np.sqrt(len(v)) for t, v in values.items()}
    # The headline is the mean of five independent task means: its variance is theirs / 25.
    want = 100 * np.sqrt(sum(s**2 for s in se.values())) / len(TABLE1)
    assert headline_se(values) == pytest.approx(want)
    # A task outside Table 1 (ARC-Easy) is shown, not averaged: it changes neither.
    more = {**values, "arc_easy": np.zeros(7)}
    assert headline_se(more) == pytest.approx(want)
    assert headline(accuracy(more)) == pytest.approx(headline(accuracy(values)))


def test_a_method_against_itself_differs_by_zero_and_a_constant_lead_has_no_error():
    values = {t: np.array([0.0, 1.0, 1.0, 0.0]) for t in TABLE1}
    assert headline_se({t: v - v for t, v in values.items()}) == 0.0
    lead = {t: np.minimum(v + 1, 1.0) - v for t, v in values.items()}  # +1 where it was 0
    assert headline_se(lead) > 0
    assert headline_se({t: np.full(4, 0.5) for t in TABLE1}) == 0.0
