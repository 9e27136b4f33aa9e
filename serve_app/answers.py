"""What experts answer, without torch: the engines (serve_app.experts) make these, and the
ingress and the remote experts, which load no model, read them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: Mask markers a client may write; each becomes the expert's own mask token.
MASK_MARKERS = re.compile(r"\[MASK\]|<mask>", re.IGNORECASE)


@dataclass(frozen=True)
class Score:
    """A text's loss under one expert."""

    bits: float  # -log2 likelihood of the counted tokens
    bytes: int  # UTF-8 bytes those tokens cover
    tokens: int  # tokens counted

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte."""
        return self.bits / self.bytes


@dataclass(frozen=True)
class Generation:
    """A text-generation answer with OpenAI-style accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens, deadline)
    max_new_tokens: int = 0  # what the expert allowed: the request's, or less to fit its context


@dataclass(frozen=True)
class Filled:
    """A fill-mask answer: the top predictions of every mask, and the text filled with the
    best of each."""

    text: str
    masks: list[list[dict[str, Any]]]  # per mask: [{"token", "score"}, ...], best first


def has_mask(prompt: str) -> bool:
    """Whether a prompt carries a mask marker a fill-mask expert can fill."""
    return bool(MASK_MARKERS.search(prompt))


def whole(text: str) -> str:
    """`text` without trailing replacement characters: an answer cut inside a character (a
    byte-level token holding its first bytes) decodes them as U+FFFD, which is dropped, not
    sent."""
    return text.rstrip("\ufffd")


def stop_at(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first of the stop strings begins in `text`, or None: an answer ends before it
    (OpenAI's `stop`: the stop string itself is not returned)."""
    found = [i for s in stop if (i := text.find(s)) >= 0]
    return min(found) if found else None


class StopText:
    """Streamed text cut at the first stop string: `feed` returns what can be sent now, and
    holds back a tail that may yet begin a stop string; `done` once one was found."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.held = ""
        self.done = False

    def feed(self, piece: str) -> str:
        """What of `piece` can be sent now ("" after the stop string)."""
        if self.done:
            return ""
        text = self.held + piece
        cut = stop_at(text, self.stop)
        if cut is not None:
            self.held, self.done = "", True
            return text[:cut]
        # the longest tail of text that begins some stop string: a match can only start there
        keep = max(
            (
                n
                for s in self.stop
                for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-n:])
            ),
            default=0,
        )
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held tail, when the text ended without a stop string."""
        held, self.held = self.held, ""
        return "" if self.done else held
