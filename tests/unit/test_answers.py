"""Answers without torch: stop strings cut a whole answer and a streamed one alike."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from serve_app.answers import StopText, stop_at


def _streamed(pieces: list[str], stop: tuple[str, ...]) -> str:
    cut = StopText(stop)
    return "".join(cut.feed(p) for p in pieces) + cut.flush()


def test_the_first_stop_string_in_the_text_wins_whichever_is_listed_first():
    assert stop_at("a, b. c", (".", ",")) == 1
    assert stop_at("abc", ("x",)) is None
    assert stop_at("abc", ()) is None


def test_a_stop_string_split_across_pieces_is_held_back_then_cut():
    cut = StopText(("\n\nUser:",))
    assert cut.feed("Hello\n") == "Hello"  # "\n" may begin the stop string: held
    assert cut.feed("\nUs") == ""
    assert cut.feed("er: more") == ""
    assert cut.done and cut.feed("anything") == "" and cut.flush() == ""


def test_text_that_only_looked_like_a_stop_string_is_sent_after_all():
    cut = StopText(("END",))
    assert cut.feed("the EN") == "the "
    assert cut.feed("D") == ""  # "END" complete: cut
    cut = StopText(("END",))
    assert cut.feed("the EN") == "the "
    assert cut.feed("d of it") == "ENd of it"
    assert cut.flush() == "" and not cut.done
    cut = StopText(("END",))
    assert cut.feed("last E") == "last " and cut.flush() == "E"  # the text ended there


@given(
    text=st.text(alphabet="ab\n:", max_size=40),
    stop=st.lists(st.text(alphabet="ab\n:", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_streamed_in_any_pieces_the_text_is_the_answer_cut_where_generation_stops(text, stop, cuts):
    # Generation stops at the first piece (token) after which a stop string appears; the
    # answer is the text up to there, cut before the first stop string in it. (With one stop
    # string inside another, that can differ from cutting the whole text.)
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    upto = next((b for b in bounds[1:] if stop_at(text[:b], tuple(stop)) is not None), None)
    answer = text if upto is None else text[: stop_at(text[:upto], tuple(stop))]
    assert _streamed(pieces, tuple(stop)) == answer


def test_a_stop_string_inside_another_cuts_where_the_stream_first_holds_one():
    assert _streamed(["ab", ":"], ("ab:", "b")) == "a"  # "b" came first; "ab:" never formed
    assert _streamed(["ab:"], ("ab:", "b")) == ""  # both in one piece: the earlier one
