from __future__ import annotations

import numpy as np
import pytest

from serve_app.learn.metrics import choose, expected_random, expert_errors, summarize

TRUTH = np.array(
    [
        [1.0, 2.0, 3.0],  # expert 0 best
        [2.0, 1.0, 1.0],  # a tie between 1 and 2
        [3.0, 2.5, 2.0],  # expert 2 best
    ]
)


def test_top1_counts_ties_and_regret_is_the_distance_to_the_best():
    chosen = np.array([0, 2, 0])
    assert summarize(chosen, TRUTH) == pytest.approx(
        {"top1": 2 / 3, "regret": (0 + 0 + 1.0) / 3, "mean_loss": (1 + 1 + 3) / 3, "scored": 3}
    )


def test_choose_takes_the_lowest_score():
    assert choose(TRUTH).tolist() == [0, 1, 2]
    assert summarize(choose(TRUTH), TRUTH)["top1"] == 1.0


def test_random_is_the_exact_expectation_of_a_uniform_pick():
    figures = expected_random(TRUTH)
    assert figures["top1"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 3)
    assert figures["regret"] == pytest.approx((3 / 3 + 1 / 3 + 1.5 / 3) / 3)
    assert figures["mean_loss"] == pytest.approx(TRUTH.mean())


def test_expert_errors_are_mean_absolute_errors():
    pred = TRUTH + np.array([0.5, -1.0, 0.0])
    assert expert_errors(pred, TRUTH, ["a", "b", "c"]) == pytest.approx(
        {"a": 0.5, "b": 1.0, "c": 0.0}
    )


def test_a_missing_loss_is_left_out_not_counted_as_zero():
    truth = np.array(
        [
            [1.0, np.nan, 3.0],  # expert 1 never measured here
            [2.0, 1.0, np.nan],
        ]
    )
    # Choosing the unmeasured expert leaves the prompt out of the figures.
    assert summarize(np.array([1, 1]), truth) == pytest.approx(
        {"top1": 1.0, "regret": 0.0, "mean_loss": 1.0, "scored": 1}
    )
    # The best of a prompt is the best measured: 1.0 on the first, not the missing cell.
    assert summarize(np.array([2, 0]), truth)["regret"] == pytest.approx((2.0 + 1.0) / 2)
    assert choose(np.array([[np.nan, 2.0]])).tolist() == [1]
    rand = expected_random(truth)
    assert rand["top1"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert rand["mean_loss"] == pytest.approx((2.0 + 1.5) / 2)
