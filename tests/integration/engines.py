"""Engines that tests bind in place of the default loader (STYLE: pass the engine in)."""

from __future__ import annotations

import time

from serve_app.experts import HFExpert


class BrokenGenerator(HFExpert):
    """A real model that loads and scores, but whose generation fails, as a bad GPU would."""

    def generate(self, *args, **kwargs):
        raise RuntimeError("simulated device fault in generate")


def load_broken(model: str, task: str) -> BrokenGenerator:
    return BrokenGenerator(model, task)


class SlowGenerator(HFExpert):
    """A real model whose generation hangs, as a wedged replica would (scoring still works)."""

    def generate(self, *args, **kwargs):
        time.sleep(120)
        return super().generate(*args, **kwargs)


def load_slow(model: str, task: str) -> SlowGenerator:
    return SlowGenerator(model, task)


class PausingGenerator(HFExpert):
    """A real model that takes PAUSE_S per generation, so a queue builds up in front of it."""

    PAUSE_S = 3.0

    def generate(self, *args, **kwargs):
        time.sleep(self.PAUSE_S)
        return super().generate(*args, **kwargs)


def load_pausing(model: str, task: str) -> PausingGenerator:
    return PausingGenerator(model, task)
