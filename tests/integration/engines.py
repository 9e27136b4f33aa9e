"""Engines that tests bind in place of the default loader (STYLE: pass the engine in)."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import torch

from serve_app.experts import HFExpert


class BrokenGenerator(HFExpert):
    """A real model that loads and scores, but whose generation fails, as a bad GPU would."""

    def generate(self, *args, **kwargs):
        raise RuntimeError("simulated device fault in generate")


def load_broken(model: str, task: str) -> BrokenGenerator:
    return BrokenGenerator(model, task)


class SlowGenerator(HFExpert):
    """A real model whose generation hangs, as a wedged replica would (scoring still works),
    and whose streamed tokens come a tenth of a second apart, as a large model's would."""

    def generate(self, *args, **kwargs):
        time.sleep(120)
        return super().generate(*args, **kwargs)

    def _run(self, enc, max_new_tokens, temperature, top_p, seed, stopping, streamer=None):
        from transformers import StoppingCriteria

        class Slowly(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                time.sleep(0.1)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        stopping.append(Slowly())
        return super()._run(enc, max_new_tokens, temperature, top_p, seed, stopping, streamer)


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


def fault_marker(model: str) -> Path:
    """Where DeviceFaultOnce notes that its device already broke once (per model folder)."""
    digest = hashlib.sha1(str(Path(model).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tryage-device-fault-{digest}"


class DeviceFaultOnce(HFExpert):
    """A real model whose device breaks on its first fill-mask, as a GPU's device-side assert
    would; a replica started after that (a replacement) works."""

    broken = False  # a broken device stays broken for the life of its process

    def fill_mask(self, *args, **kwargs):
        marker = fault_marker(self.model.name_or_path)
        if not marker.exists():
            marker.write_text("broken once")
            self.broken = True
        if self.broken:
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return super().fill_mask(*args, **kwargs)


def load_device_fault_once(model: str, task: str) -> DeviceFaultOnce:
    return DeviceFaultOnce(model, task)


def load_unloadable(model: str, task: str) -> HFExpert:
    """An expert whose weights cannot be loaded (a corrupt or missing file)."""
    raise OSError(f"simulated unreadable weights at {model}")
