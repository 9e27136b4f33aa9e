"""The load shape: piecewise-linear stages of simulated users over time. Pure, no Locust.

A profile is a list of stages; each moves the user count linearly from where the previous
stage ended to its own `users` over `duration_s`. The last stage, at zero users, is the idle
window in which experts are expected to scale back to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage: reach `users` linearly over `duration_s` seconds."""

    name: str
    duration_s: float
    users: int


#: Profiles by name. `short` fits `make loadtest` (at most 5 minutes with start-up) when the
#: experts' downscale delays are shortened (the runner's --downscale-to-zero-s, 15 s by
#: default for this profile); `long` keeps a library's own delays (300 s to zero by default).
PROFILES: dict[str, list[Stage]] = {
    "short": [
        Stage("ramp-up", 30, 16),
        Stage("hold", 60, 16),
        Stage("ramp-down", 20, 0),
        Stage("idle", 75, 0),
    ],
    "long": [
        Stage("ramp-up", 120, 32),
        Stage("hold", 600, 32),
        Stage("ramp-down", 120, 0),
        Stage("idle", 420, 0),
    ],
}


def scaled(stages: list[Stage], peak: int) -> list[Stage]:
    """The same shape with its peak user count set to `peak`."""
    if peak < 1:
        raise ValueError(f"peak users must be >= 1, got {peak}")
    top = max(s.users for s in stages)
    return [Stage(s.name, s.duration_s, math.ceil(s.users * peak / top)) for s in stages]


def total_s(stages: list[Stage]) -> float:
    """Length of the whole shape in seconds."""
    return sum(s.duration_s for s in stages)


def stage_at(stages: list[Stage], t: float) -> Stage | None:
    """The stage running at `t` seconds, None once the shape is over."""
    start = 0.0
    for stage in stages:
        if t < start + stage.duration_s:
            return stage
        start += stage.duration_s
    return None


def users_at(stages: list[Stage], t: float) -> int | None:
    """Simulated users wanted at `t` seconds since the start; None once the shape is over."""
    start, before = 0.0, 0
    for stage in stages:
        if t < start + stage.duration_s:
            frac = (t - start) / stage.duration_s
            return round(before + frac * (stage.users - before))
        start, before = start + stage.duration_s, stage.users
    return None


def tick(stages: list[Stage], t: float) -> tuple[int, float] | None:
    """What a Locust `LoadTestShape.tick` returns: (users, spawn rate) or None to stop.

    The spawn rate is high enough to reach each second's target within that second, so the
    user count follows the stages rather than Locust's own ramp.
    """
    users = users_at(stages, t)
    if users is None:
        return None
    return users, float(max(1, max(s.users for s in stages)))
