"""Builders: wire a validated library into a Ray Serve application. No model loading here.

serve run serve_app.app:build_app library=path/to/library.yaml
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.expert import ExpertDeployment
from deployments.ingress import Ingress
from deployments.router import RouterDeployment
from serve_app.config import (
    INGRESS_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    LibraryConfig,
    load_library,
)
from serve_app.experts import load_expert
from serve_app.router import LearnedRouter

#: Where `tryage demo build` writes the demo library, served when no library is given.
DEFAULT_LIBRARY = Path("libraries/demo/library.yaml")


class AppArgs(BaseModel):
    """Arguments of `build_app`, as `serve run ... library=FILE` passes them."""

    model_config = ConfigDict(extra="forbid")

    library: Path = Field(DEFAULT_LIBRARY, description="Path of library.yaml.")


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The Serve application for a library file: `{"library": FILE}`."""
    args = AppArgs.model_validate(args or {})
    return build_graph(load_library(args.library))


def build_graph(
    library: LibraryConfig,
    *,
    load_router: Callable[..., Any] = LearnedRouter,
    load_experts: dict[str, Callable[[str, str], Any]] | None = None,
) -> Application:
    """Bind router, one deployment per expert (named after it) and the ingress.

    `load_router` and `load_experts` (by expert name) replace the real model loaders; tests
    use them to bind tiny or failing engines.
    """
    load_experts = load_experts or {}
    i = library.ingress
    r = library.router
    router = RouterDeployment.options(
        name=ROUTER_DEPLOYMENT,
        ray_actor_options=r.resources,
        autoscaling_config=r.autoscaling,
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
        backpressure_config=i.backpressure,
        user_config=r.batching.model_dump(),
    ).bind(encoder=r.model, checkpoint=str(r.checkpoint), load=load_router)
    experts = {
        e.name: ExpertDeployment.options(
            name=e.name,
            ray_actor_options=e.resources,
            autoscaling_config=e.autoscaling,
            max_ongoing_requests=e.max_ongoing_requests,
            max_queued_requests=e.max_queued_requests,
            backpressure_config=i.backpressure,
            user_config=e.batching.model_dump(),
        ).bind(model=e.model, task=e.task, load=load_experts.get(e.name, load_expert))
        for e in library.experts
    }
    return Ingress.options(
        name=INGRESS_DEPLOYMENT,
        ray_actor_options=i.resources,
        num_replicas=i.num_replicas,
        max_ongoing_requests=i.max_ongoing_requests,
        max_queued_requests=i.max_queued_requests,
        backpressure_config=i.backpressure,
    ).bind(library, router, experts)
