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
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens or the deadline reached)
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
