"""The objective: penalties, flags, weights, eligibility and ranking (pure functions)."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, replace

import pytest

from serve_app import objective
from serve_app.config import WEIGHT_NAMES, ExpertConfig
from serve_app.errors import BadRequest, UnknownExpert


@dataclass(frozen=True)
class Expert:
    """The fields the objective reads of an expert."""

    name: str
    params: int | None = 1_000_000
    released: dt.date = dt.date(2024, 1, 1)
    task: str = "text-generation"
    trusted: bool = True
    verbosity: float | None = None
    readability: float | None = None


# Sizes a decade apart, so the log scale puts `mid` at exactly half way (a linear one would not).
# Release dates ten days apart, so `mid` is half way there too.
SMALL = Expert("small", params=10**6, released=dt.date(2024, 1, 1), trusted=False)
MID = Expert("mid", params=10**7, released=dt.date(2024, 1, 11))
BIG = Expert("big", params=10**8, released=dt.date(2024, 1, 21))
LIBRARY = [SMALL, MID, BIG]


# --- penalties ---------------------------------------------------------------------------


def test_penalties_cover_every_weight_for_every_expert():
    table = objective.penalties(LIBRARY)
    assert set(table) == {"small", "mid", "big"}
    assert all(set(row) == set(WEIGHT_NAMES) for row in table.values())


def test_size_penalty_is_log_params_from_smallest_0_to_largest_1():
    table = objective.penalties(LIBRARY)
    assert table["small"]["size"] == 0.0
    assert table["mid"]["size"] == pytest.approx(0.5)
    assert table["big"]["size"] == 1.0


def test_recency_penalty_is_0_for_the_newest_and_1_for_the_oldest():
    table = objective.penalties(LIBRARY)
    assert table["big"]["recency"] == 0.0
    assert table["mid"]["recency"] == pytest.approx(0.5)
    assert table["small"]["recency"] == 1.0


def test_security_penalty_is_1_for_untrusted_experts_only():
    table = objective.penalties(LIBRARY)
    assert table["small"]["security"] == 1.0
    assert table["mid"]["security"] == 0.0
    assert table["big"]["security"] == 0.0


def test_equal_experts_get_no_size_or_recency_penalty():
    same = [Expert("a", params=5_000), Expert("b", params=5_000)]
    table = objective.penalties(same)
    assert [table[n]["size"] for n in "ab"] == [0.0, 0.0]
    assert [table[n]["recency"] for n in "ab"] == [0.0, 0.0]


def test_unmeasured_verbosity_and_readability_have_no_penalty_value():
    table = objective.penalties(LIBRARY)
    for row in table.values():
        assert row["verbosity"] is None
        assert row["readability"] is None


def test_verbosity_penalises_long_output_and_readability_penalises_hard_text():
    experts = [
        Expert("terse", verbosity=100.0, readability=80.0),
        Expert("chatty", verbosity=300.0, readability=20.0),
        Expert("middling", verbosity=200.0, readability=50.0),
    ]
    table = objective.penalties(experts)
    assert [table[n]["verbosity"] for n in ("terse", "middling", "chatty")] == [0.0, 0.5, 1.0]
    # Flesch reading ease: higher is easier to read, so the highest score gets 0.
    assert [table[n]["readability"] for n in ("terse", "middling", "chatty")] == [0.0, 0.5, 1.0]


def test_a_partly_measured_library_keeps_none_where_nothing_was_measured():
    experts = [
        Expert("a", verbosity=10.0),
        Expert("b", verbosity=30.0),
        Expert("c", verbosity=None),
    ]
    table = objective.penalties(experts)
    assert (table["a"]["verbosity"], table["b"]["verbosity"]) == (0.0, 1.0)
    assert table["c"]["verbosity"] is None


def test_penalties_read_expert_configs_as_the_library_holds_them():
    configs = [
        ExpertConfig(
            name=e.name,
            model=f"org/{e.name}",
            task=e.task,
            params=e.params,
            released=e.released,
            trusted=e.trusted,
        )
        for e in LIBRARY
    ]
    assert objective.penalties(configs) == objective.penalties(LIBRARY)


# --- rank --------------------------------------------------------------------------------

PREDICTED = {"small": 1.5, "mid": 1.1, "big": 1.0}


def test_without_weights_the_lowest_predicted_loss_wins():
    ranking = objective.rank(PREDICTED, objective.penalties(LIBRARY), {})
    assert [r.expert for r in ranking] == ["big", "mid", "small"]
    assert all(r.score == r.predicted_loss and r.penalty == 0.0 for r in ranking)


def test_score_is_loss_plus_weighted_penalties_lowest_first():
    weights = {"size": 0.4, "security": 0.1}
    ranking = objective.rank(PREDICTED, objective.penalties(LIBRARY), weights)
    by_name = {r.expert: r for r in ranking}
    # small: no size penalty, untrusted; mid: half size; big: full size.
    assert by_name["small"].penalty == pytest.approx(0.1)
    assert by_name["mid"].penalty == pytest.approx(0.2)
    assert by_name["big"].penalty == pytest.approx(0.4)
    assert by_name["small"].score == pytest.approx(1.6)
    assert by_name["mid"].score == pytest.approx(1.3)
    assert by_name["big"].score == pytest.approx(1.4)
    assert [r.expert for r in ranking] == ["mid", "big", "small"]
    assert by_name["mid"].predicted_loss == 1.1


def test_ties_go_by_name():
    ranking = objective.rank({"b": 1.0, "c": 1.0, "a": 1.0}, {}, {})
    assert [r.expert for r in ranking] == ["a", "b", "c"]


def test_a_large_size_weight_picks_the_smallest_expert():
    weights = {"size": objective.FLAG_WEIGHT}
    ranking = objective.rank(PREDICTED, objective.penalties(LIBRARY), weights)
    assert ranking[0].expert == "small"


def test_a_large_recency_weight_picks_the_newest_expert():
    predicted = {"small": 1.0, "mid": 1.1, "big": 1.5}
    weights = {"recency": objective.FLAG_WEIGHT}
    ranking = objective.rank(predicted, objective.penalties(LIBRARY), weights)
    assert ranking[0].expert == "big"


def test_candidates_restrict_the_ranking():
    ranking = objective.rank(PREDICTED, objective.penalties(LIBRARY), {}, ["small", "mid"])
    assert [r.expert for r in ranking] == ["mid", "small"]


def test_a_weight_on_an_unmeasured_penalty_is_a_bad_request():
    with pytest.raises(BadRequest, match="verbosity") as err:
        objective.rank(PREDICTED, objective.penalties(LIBRARY), {"verbosity": 1.0})
    assert err.value.status == 400
    assert err.value.param == "weights"


def test_a_zero_weight_on_an_unmeasured_penalty_is_ignored():
    ranking = objective.rank(PREDICTED, objective.penalties(LIBRARY), {"verbosity": 0.0})
    assert ranking[0].expert == "big"


def test_ranked_as_dict_is_the_json_shape():
    ranked = objective.rank({"a": 1.0}, {}, {})[0]
    assert ranked.as_dict() == {"expert": "a", "predicted_loss": 1.0, "penalty": 0.0, "score": 1.0}


# --- parse_flags -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "weight"),
    [("smallest", "size"), ("newest", "recency"), ("trusted", "security")],
)
def test_a_word_flag_sets_its_weight_to_the_flag_weight(flag, weight):
    prompt, weights = objective.parse_flags(f"[flag: {flag}] Tell me a joke")
    assert prompt == "Tell me a joke"
    assert weights == {weight: objective.FLAG_WEIGHT}


def test_flags_in_a_comma_list_all_apply():
    prompt, weights = objective.parse_flags("[flag: smallest, newest] hi")
    assert prompt == "hi"
    assert weights == {"size": objective.FLAG_WEIGHT, "recency": objective.FLAG_WEIGHT}


def test_a_flag_can_set_a_weight_to_a_number():
    prompt, weights = objective.parse_flags("[flag: size=0.3] hi")
    assert (prompt, weights) == ("hi", {"size": 0.3})


def test_flags_are_case_insensitive():
    _, weights = objective.parse_flags("[FLAG: Smallest, RECENCY=2] hi")
    assert weights == {"size": objective.FLAG_WEIGHT, "recency": 2.0}


def test_flags_are_removed_wherever_they_are_in_the_prompt():
    prompt, weights = objective.parse_flags("Summarise [flag: trusted] this [flag:newest] text")
    assert prompt == "Summarise this text"
    assert set(weights) == {"security", "recency"}


def test_a_prompt_without_flags_is_unchanged():
    assert objective.parse_flags("Explain [brackets] please") == ("Explain [brackets] please", {})


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("def add(a, b):\n    ", "def add(a, b):\n    "),  # the indentation is continued
        ("Q: 2+2?\nA: ", "Q: 2+2?\nA: "),
        ("\n\nHuman: hi\n\nAssistant: ", "\n\nHuman: hi\n\nAssistant: "),
        ("[flag: smallest] def f():\n    ", "def f():\n    "),
        ("  [flag: smallest]\n\nWrite a poem", "Write a poem"),
        ("[flag: smallest]\n    x = 1\n    y", "    x = 1\n    y"),  # the first line's indent
        ("Explain recursion [flag: smallest]\n", "Explain recursion"),
    ],
)
def test_a_prompt_keeps_its_own_whitespace_and_loses_what_a_marker_left(prompt, expected):
    assert objective.parse_flags(prompt)[0] == expected


def test_an_unknown_flag_is_a_bad_request_naming_it():
    with pytest.raises(BadRequest, match="'fastest'") as err:
        objective.parse_flags("[flag: fastest] hi")
    assert err.value.param == "prompt"
    assert "smallest" in err.value.message  # the known flags are listed


def test_an_unknown_weight_in_a_flag_is_a_bad_request_naming_it():
    with pytest.raises(BadRequest, match="'speed'"):
        objective.parse_flags("[flag: speed=1] hi")


def test_a_negative_flag_weight_is_a_bad_request_about_the_prompt():
    with pytest.raises(BadRequest, match="'size'") as err:
        objective.parse_flags("[flag: size=-1] hi")
    assert err.value.param == "prompt"


def test_a_flag_weight_that_is_not_a_number_is_a_bad_request():
    with pytest.raises(BadRequest, match="'lots'"):
        objective.parse_flags("[flag: size=lots] hi")


# --- merge_weights -----------------------------------------------------------------------


def test_later_weight_layers_override_earlier_ones_key_by_key():
    merged = objective.merge_weights(
        {"size": 1.0, "recency": 2.0}, None, {"size": 0.5}, {"security": 1.0}
    )
    assert merged == {"size": 0.5, "recency": 2.0, "security": 1.0}


def test_no_layers_merge_to_no_weights():
    assert objective.merge_weights() == {}


@pytest.mark.parametrize(
    ("weights", "named"),
    [
        ({"sise": 1.0}, "'sise'"),
        ({"size": -0.1}, "'size'"),
        ({"recency": math.nan}, "'recency'"),
        ({"security": math.inf}, "'security'"),
        ({"size": "1"}, "'size'"),
    ],
    ids=["unknown", "negative", "nan", "inf", "string"],
)
def test_bad_weights_are_a_bad_request_naming_the_weight(weights, named):
    with pytest.raises(BadRequest, match=named) as err:
        objective.merge_weights({"size": 0.0}, weights)
    assert err.value.status == 400
    assert err.value.param == "weights"


# --- eligible ----------------------------------------------------------------------------

MASKER = Expert("masker", task="fill-mask")
WITH_MASKER = [*LIBRARY, MASKER]


def test_every_expert_is_eligible_without_an_allow_list_or_task():
    assert objective.eligible(WITH_MASKER) == ["small", "mid", "big", "masker"]


def test_the_allow_list_restricts_the_experts():
    assert objective.eligible(WITH_MASKER, allow=("big", "small")) == ["small", "big"]


def test_an_unknown_expert_in_the_allow_list_is_not_found():
    with pytest.raises(UnknownExpert, match="'huge'") as err:
        objective.eligible(WITH_MASKER, allow=["small", "huge"])
    assert err.value.status == 404
    assert "small, mid, big, masker" in err.value.message


def test_an_empty_allow_list_is_a_bad_request():
    with pytest.raises(BadRequest, match="empty") as err:
        objective.eligible(WITH_MASKER, allow=[])
    assert err.value.status == 400


def test_the_task_filters_the_experts():
    assert objective.eligible(WITH_MASKER, task="fill-mask") == ["masker"]
    assert objective.eligible(WITH_MASKER, task="text-generation") == ["small", "mid", "big"]


def test_no_eligible_expert_is_a_bad_request_naming_the_task():
    with pytest.raises(BadRequest, match="fill-mask") as err:
        objective.eligible(WITH_MASKER, allow=["small", "mid"], task="fill-mask")
    assert err.value.status == 400
    assert not isinstance(err.value, UnknownExpert)


def test_a_library_without_the_task_has_no_eligible_expert():
    with pytest.raises(BadRequest, match="fill-mask"):
        objective.eligible([replace(SMALL, task="text-generation")], task="fill-mask")


# --- the operator's policy ---------------------------------------------------------------


def test_trusted_only_never_makes_an_untrusted_expert_eligible():
    assert objective.eligible(LIBRARY, trusted_only=True) == ["mid", "big"]
    with pytest.raises(BadRequest, match="'small' is untrusted") as err:
        objective.eligible(LIBRARY, allow=["small", "mid"], trusted_only=True)
    assert err.value.status == 400


def test_a_weight_the_policy_fixes_is_refused_naming_it():
    assert objective.user_layer({"size": 1.0}, ("size",), "the request") == {"size": 1.0}
    with pytest.raises(BadRequest, match=r"'security'.*may set: size") as err:
        objective.user_layer({"security": 0.0}, ("size",), "the request")
    assert err.value.param == "weights"
    with pytest.raises(BadRequest, match="a prompt flag set weight 'security'") as err:
        objective.user_layer({"security": 0.0}, ("size",), "a prompt flag")
    assert err.value.param == "prompt"


def test_request_weights_beat_prompt_flags_beat_library_defaults():
    # The ingress merges in this order: defaults, flags, the request.
    merged = objective.merge_weights(
        {"size": 1.0, "recency": 1.0}, {"size": 2.0, "security": 2.0}, {"security": 3.0}
    )
    assert merged == {"size": 2.0, "recency": 1.0, "security": 3.0}


def test_weights_are_bounded_so_every_score_is_finite():
    with pytest.raises(BadRequest, match="'size'"):
        objective.merge_weights({"size": 1e308})
    ranking = objective.rank(
        {"small": 1.0, "big": 2.0},
        objective.penalties([SMALL, BIG]),
        objective.merge_weights({"size": 1000.0}),
    )
    assert all(math.isfinite(r.score) for r in ranking)


def test_thousands_of_unclosed_flag_markers_are_left_as_text():
    prompt = "[flag:" * 6000 + " [flag: smallest] tail"
    text, weights = objective.parse_flags(prompt)
    assert weights == {"size": objective.FLAG_WEIGHT}
    assert text.endswith("tail") and text.count("[flag:") == 6000


# --- cost --------------------------------------------------------------------------------


def test_the_cost_penalty_ranks_by_price_and_an_expert_without_one_is_free():
    from serve_app.config import Price

    cheap = replace(MID, name="cheap")
    dear = replace(BIG, name="dear")
    object.__setattr__(cheap, "price", Price(input_per_mtok=0.5, output_per_mtok=1.5))
    object.__setattr__(dear, "price", Price(input_per_mtok=5.0, output_per_mtok=15.0))
    table = objective.penalties([SMALL, cheap, dear])
    assert table["small"]["cost"] == 0.0  # no price: free
    assert table["dear"]["cost"] == 1.0
    assert table["cheap"]["cost"] == pytest.approx(2.0 / 20.0)
    ranking = objective.rank({"small": 2.0, "cheap": 1.95, "dear": 1.0}, table, {"cost": 2.0})
    assert ranking[0].expert == "dear" or ranking[0].score <= ranking[1].score
    assert [r.expert for r in ranking] == ["small", "cheap", "dear"]


def test_a_cheapest_flag_sets_the_cost_weight():
    _, weights = objective.parse_flags("[flag: cheapest] hi")
    assert weights == {"cost": objective.FLAG_WEIGHT}


def test_an_unknown_weight_is_named_as_unknown_not_as_fixed_by_the_policy():
    with pytest.raises(BadRequest, match=r"unknown weight 'sise'; known: size, .*cost") as err:
        objective.user_layer({"sise": 1.0}, ("size", "recency"), "the request")
    assert err.value.param == "weights"
