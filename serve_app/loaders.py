"""The real model loaders, the deployments' defaults, importing torch only when called.

The driver that binds the graph (`tryage serve`, `serve run`) holds no model, so it imports
no torch; the router's and experts' replicas that call these do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.experts import HFExpert
    from serve_app.router import LearnedRouter


def load_expert(model: str, task: str, revision: str | None = None) -> HFExpert:
    """serve_app.experts.load_expert: a Hugging Face model on the device torch sees."""
    from serve_app import experts

    return experts.load_expert(model, task, revision)


def load_router(encoder: str, checkpoint: str | Path, revision: str | None = None) -> LearnedRouter:
    """serve_app.router.LearnedRouter: the encoder and the trained head of `checkpoint`."""
    from serve_app.router import LearnedRouter

    return LearnedRouter(encoder, checkpoint, revision=revision)
