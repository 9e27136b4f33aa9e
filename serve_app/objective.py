"""The objective: predicted losses + weighted penalties -> a ranking. Pure, no torch or Ray.

score(expert) = predicted_loss(expert) + sum_w weight_w * penalty_w(expert); the lowest wins.

Predicted losses are in bits per UTF-8 byte. Every penalty is normalised to [0, 1] across the
whole library (not just the eligible experts), so a weight means the same thing whatever the
allow-list: a weight of 0.5 on `size` says "the largest expert must be 0.5 bits/byte better
than the smallest to be chosen".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from serve_app.config import WEIGHT_NAMES, check_weights
from serve_app.errors import BadRequest, UnknownExpert

#: Weight set by a paper-style flag such as `[flag: smallest]`: larger than any realistic
#: difference in loss (bits per byte), so the flag decides among the eligible experts.
FLAG_WEIGHT = 100.0
FLAGS = {
    "smallest": "size",
    "small": "size",
    "newest": "recency",
    "recent": "recency",
    "trusted": "security",
    "secure": "security",
    "concise": "verbosity",
    "brief": "verbosity",
    "readable": "readability",
    "simple": "readability",
    "cheapest": "cost",
    "cheap": "cost",
}
# The body stops at the next bracket either way, so a scan never runs past the next '[': linear
# in the prompt's length even for thousands of unclosed `[flag:` (the body of a marker has no
# brackets anyway).
_FLAG = re.compile(r"\[\s*flag\s*:([^\[\]]*)\][ \t]?", re.IGNORECASE)
_FLAG_AT_END = re.compile(_FLAG.pattern + r"\s*\Z", re.IGNORECASE)
# What a leading marker leaves: the blank lines before the text (not its first line's
# indentation), or, without a newline, every leading space.
_LEFT_BEFORE = re.compile(r"\A(?:\s*\n|\s+)")


class ExpertMeta(Protocol):
    """What the objective reads of an expert (ExpertConfig has it)."""

    name: str
    task: str
    params: int | None
    trusted: bool
    verbosity: float | None
    readability: float | None

    @property
    def released(self): ...

    @property
    def price(self): ...


@dataclass(frozen=True)
class Ranked:
    """One expert's place in a ranking."""

    expert: str
    predicted_loss: float
    penalty: float
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


def weighted_penalties(
    expert: str, table: Mapping[str, Mapping[str, float | None]], weights: Mapping[str, float]
) -> dict[str, float]:
    """An expert's weighted penalty terms by weight name (the weights set, `penalties`'s
    table): what its `penalty` in a ranking sums."""
    return {w: v * table[expert][w] for w, v in weights.items() if v}


def _spread(values: Mapping[str, float | None], lower_is_better: bool = True) -> dict:
    """Min-max normalise to [0, 1] (0 = best); None stays None; all equal -> all 0."""
    known = [v for v in values.values() if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 0.0)
    out: dict[str, float | None] = {}
    for name, v in values.items():
        if v is None:
            out[name] = None
        elif hi == lo:
            out[name] = 0.0
        else:
            x = (v - lo) / (hi - lo)
            out[name] = x if lower_is_better else 1.0 - x
    return out


def penalties(experts: Sequence[ExpertMeta]) -> dict[str, dict[str, float | None]]:
    """Each expert's penalties in [0, 1] by weight name; None where nothing was measured.

    size: log of the parameter count (smallest 0, largest 1); recency: release date (newest 0,
    oldest 1); security: 1 for an untrusted expert; verbosity: measured mean output length
    (shortest 0); readability: measured reading ease (most readable 0); cost: price per
    million tokens, prompt plus output (cheapest 0; an expert without a price is free).
    """
    by_weight = {
        "size": _spread({e.name: math.log(e.params) if e.params else None for e in experts}),
        "recency": _spread(
            {e.name: float(e.released.toordinal()) for e in experts}, lower_is_better=False
        ),
        "security": {e.name: 0.0 if e.trusted else 1.0 for e in experts},
        "verbosity": _spread({e.name: e.verbosity for e in experts}),
        "readability": _spread({e.name: e.readability for e in experts}, lower_is_better=False),
        "cost": _spread({e.name: _price(e) for e in experts}),
    }
    assert set(by_weight) == set(WEIGHT_NAMES), "every weight needs a penalty"
    return {e.name: {w: by_weight[w][e.name] for w in WEIGHT_NAMES} for e in experts}


def _price(expert: ExpertMeta) -> float:
    price = getattr(expert, "price", None)
    return float(price.blended) if price is not None else 0.0


def parse_flags(prompt: str) -> tuple[str, dict[str, float]]:
    """Strip `[flag: ...]` markers from a prompt and return the weights they set.

    `[flag: smallest]`, `[flag: newest]`, `[flag: trusted]`, `[flag: concise]` and
    `[flag: readable]` set their weight to FLAG_WEIGHT; `[flag: size=0.3]` sets any weight to
    a value; several may share one marker, separated by commas.
    """
    weights: dict[str, float] = {}
    for match in _FLAG.finditer(prompt):
        for item in filter(None, (part.strip().lower() for part in match.group(1).split(","))):
            name, sep, value = (s.strip() for s in item.partition("="))
            if sep:
                try:
                    weights[name] = float(value)
                except ValueError:
                    raise BadRequest(
                        f"flag {item!r}: {value!r} is not a number", "prompt"
                    ) from None
            elif item in FLAGS:
                weights[FLAGS[item]] = FLAG_WEIGHT
            else:
                known = ", ".join([*FLAGS, *(f"{w}=<number>" for w in WEIGHT_NAMES)])
                raise BadRequest(f"unknown flag {item!r}; known: {known}", "prompt")
    try:
        check_weights(weights)
    except ValueError as err:
        raise BadRequest(f"in a flag: {err}", "prompt") from None
    return _without_flags(prompt), weights


def _without_flags(prompt: str) -> str:
    """The prompt without its markers. Its own whitespace is kept (a completion prompt's
    trailing indentation or "A: " is part of what the expert continues); only whitespace
    that a marker at the very start or end leaves behind goes."""
    text = _FLAG.sub("", prompt)
    if text == prompt:
        return prompt
    if _FLAG.match(prompt, len(prompt) - len(prompt.lstrip())):
        text = _LEFT_BEFORE.sub("", text)
    if _FLAG_AT_END.search(prompt):
        text = text.rstrip()
    return text


def user_layer(
    weights: Mapping[str, float] | None, settable: Sequence[str], source: str
) -> Mapping[str, float] | None:
    """A request's (or its flags') weights, refused where a name is unknown or the operator's
    policy fixes one."""
    param = "weights" if source == "the request" else "prompt"
    unknown = [name for name in weights or {} if name not in WEIGHT_NAMES]
    if unknown:
        raise BadRequest(f"unknown weight {unknown[0]!r}; known: {', '.join(WEIGHT_NAMES)}", param)
    fixed = [name for name in weights or {} if name not in settable]
    if fixed:
        allowed = ", ".join(settable) or "none"
        raise BadRequest(
            f"{source} set weight {fixed[0]!r}, which the operator's policy fixes; a request "
            f"may set: {allowed}",
            param,
        )
    return weights


def merge_weights(*layers: Mapping[str, float] | None) -> dict[str, float]:
    """Later layers override earlier ones key by key; every weight is checked.

    Serving merges library defaults, then prompt flags, then the request's weights (policy >
    request > prompt flags > library defaults; the policy acts through `user_layer` and
    `eligible`)."""
    merged: dict[str, float] = {}
    for layer in layers:
        merged.update(layer or {})
    try:
        return check_weights(merged)
    except ValueError as err:
        raise BadRequest(str(err), "weights") from None


def eligible(
    experts: Sequence[ExpertMeta],
    allow: Iterable[str] | None = None,
    task: str | None = None,
    trusted_only: bool = False,
) -> list[str]:
    """Names of the experts a request may use: the allow-list, then the task; with
    `trusted_only` (the operator's policy) never an untrusted expert."""
    names = [e.name for e in experts]
    if allow is not None:
        allow = list(allow)
        unknown = [n for n in allow if n not in names]
        if unknown:
            raise UnknownExpert(
                f"unknown expert {unknown[0]!r}; known: {', '.join(names)}", "experts"
            )
        if not allow:
            raise BadRequest("'experts' is empty: name at least one expert", "experts")
    chosen = [e for e in experts if (allow is None or e.name in allow)]
    if trusted_only:
        barred = [e.name for e in chosen if not e.trusted]
        if barred and allow is not None:
            raise BadRequest(
                f"expert {barred[0]!r} is untrusted, and the operator's policy allows trusted "
                "experts only",
                "experts",
            )
        chosen = [e for e in chosen if e.trusted]
    if task is not None:
        chosen = [e for e in chosen if e.task == task]
    if not chosen:
        raise BadRequest(
            f"no expert is eligible: none of {', '.join(allow or names)} serves task {task!r}",
            "task",
        )
    return [e.name for e in chosen]


def plan(
    library: LibraryLike,
    flags: Mapping[str, float] | None,
    weights: Mapping[str, float] | None,
    allow: Iterable[str] | None,
    task: str | None,
    masked: bool,
) -> tuple[list[str], dict[str, float]]:
    """The experts a prompt may go to and the weights that rank them: what serving and
    `tryage route` both decide before the router's predictions arrive.

    Precedence: the operator's policy > the request's weights > prompt flags > library
    defaults. `masked`: the prompt carries a [MASK] (fill-mask experts need one)."""
    policy = library.policy
    settable = policy.settable()
    merged = merge_weights(
        library.objective.weights,
        user_layer(flags, settable, "a prompt flag"),
        user_layer(weights, settable, "the request"),
    )
    names = eligible(library.experts, allow, task, trusted_only=policy.trusted_only)
    if not masked:  # a masked LM has nothing to fill without a [MASK]
        names = [n for n in names if library.expert(n).task != "fill-mask"]
        if not names:
            raise BadRequest("fill-mask experts need a [MASK] in the prompt", "prompt")
    return names, merged


class LibraryLike(Protocol):
    """What `plan` reads of a library (LibraryConfig has it)."""

    experts: Sequence[ExpertMeta]

    @property
    def policy(self): ...

    @property
    def objective(self): ...

    def expert(self, name: str) -> ExpertMeta: ...


def rank(
    predicted: Mapping[str, float],
    penalty_table: Mapping[str, Mapping[str, float | None]],
    weights: Mapping[str, float],
    candidates: Iterable[str] | None = None,
) -> list[Ranked]:
    """Rank the candidate experts by score, lowest (best) first; ties go by name."""
    names = list(predicted if candidates is None else candidates)
    ranking = []
    for name in names:
        total = 0.0
        for weight_name, w in weights.items():
            if w == 0:
                continue
            p = penalty_table[name][weight_name]
            if p is None:
                raise BadRequest(
                    f"weight {weight_name!r} needs a measured {weight_name} for every expert; "
                    f"'{name}' has none (run tryage profile to measure it)",
                    "weights",
                )
            total += w * p
        loss = float(predicted[name])
        ranking.append(Ranked(name, loss, total, loss + total))
    ranking.sort(key=lambda r: (r.score, r.expert))
    return ranking
