"""Engines that tests bind in place of the default loader (STYLE: pass the engine in)."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import torch

from serve_app.experts import HFExpert
from serve_app.router import LearnedRouter


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

    def _run(self, enc, max_new_tokens, temperature, top_p, seeds, stopping, streamer=None):
        from transformers import StoppingCriteria

        class Slowly(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                time.sleep(0.1)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        stopping.append(Slowly())
        return super()._run(enc, max_new_tokens, temperature, top_p, seeds, stopping, streamer)


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


#: A chat template that refuses a system message, as Mistral's and Gemma 2's own templates do.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
)


def load_no_system_role(model: str, task: str) -> HFExpert:
    """A real model whose chat template refuses a system message."""
    expert = HFExpert(model, task)
    expert.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    return expert


def wedge_marker(checkpoint: str | Path) -> Path:
    """While this file exists, WedgingRouter's device hangs (per router checkpoint)."""
    digest = hashlib.sha1(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"tryage-wedged-router-{digest}"


class WedgingRouter(LearnedRouter):
    """A real router whose device hangs while its wedge_marker exists (at most a minute), as
    a stuck GPU would: it neither answers nor fails."""

    def __init__(self, encoder: str, checkpoint: str | Path, revision: str | None = None):
        super().__init__(encoder, checkpoint, revision=revision)
        self.marker = wedge_marker(checkpoint)

    def predict(self, prompts: list[str]) -> list[dict[str, float]]:
        end = time.monotonic() + 60
        while self.marker.exists() and time.monotonic() < end:
            time.sleep(0.05)
        return super().predict(prompts)


def load_wedging_router(
    encoder: str, checkpoint: str | Path, revision: str | None = None
) -> WedgingRouter:
    return WedgingRouter(encoder, checkpoint, revision=revision)
