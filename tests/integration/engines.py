"""Engines that tests bind in place of the default loader (STYLE: pass the engine in)."""

from __future__ import annotations

from serve_app.experts import HFExpert


class BrokenGenerator(HFExpert):
    """A real model that loads and scores, but whose generation fails, as a bad GPU would."""

    def generate(self, *args, **kwargs):
        raise RuntimeError("simulated device fault in generate")


def load_broken(model: str, task: str) -> BrokenGenerator:
    return BrokenGenerator(model, task)
