"""Builders: wire a validated library into a Ray Serve application. No model loading here.

serve run serve_app.app:build_app library=path/to/library.yaml
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from deployments.expert import ExpertDeployment
from deployments.ingress import Ingress
from deployments.pool import PoolDeployment
from deployments.remote import RemoteExpertDeployment
from deployments.router import RouterDeployment
from serve_app.api import API_KEY_DIGESTS_ENV, API_KEYS_ENV, Guard, key_digest
from serve_app.config import ExpertConfig, LibraryConfig, load_library
from serve_app.loaders import load_expert, load_router

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


def _expert(e: ExpertConfig, library: LibraryConfig, load_experts: dict) -> Any:
    """One expert's bound deployment: its own weights, or a remote OpenAI-compatible server."""
    options = e.serve_options(library.ingress)
    if e.engine == "openai":
        return RemoteExpertDeployment.options(**options).bind(
            model=e.model, base_url=e.base_url, api_key_env=e.api_key_env, timeout_s=e.timeout_s
        )
    load = load_experts.get(e.name, load_expert)
    return ExpertDeployment.options(**options).bind(
        model=e.model, task=e.task, load=load, revision=e.revision
    )


def _pools(library: LibraryConfig, load_experts: dict) -> dict[str, Any]:
    """One bound multiplexed deployment per pool, by the name of each expert it serves."""
    out = {}
    for name, (cfg, experts) in library.pooled().items():
        specs = {
            e.name: {"model": e.model, "task": e.task, "revision": e.revision} for e in experts
        }
        loads = {e.name: load_experts[e.name] for e in experts if e.name in load_experts}
        pool = PoolDeployment.options(**cfg.serve_options(name, library.ingress)).bind(
            experts=specs, max_models_per_replica=cfg.max_models_per_replica, loads=loads
        )
        out.update(dict.fromkeys(specs, pool))
    return out


def build_graph(
    library: LibraryConfig,
    *,
    load_router: Callable[..., Any] = load_router,
    load_experts: dict[str, Callable[[str, str], Any]] | None = None,
) -> Application:
    """Bind router, one deployment per expert (named after it) or per pool of experts
    ("Pool-<name>"), and the ingress.

    `load_router` and `load_experts` (by expert name) replace the real model loaders; tests
    use them to bind tiny or failing engines. The real ones (serve_app.loaders) import torch
    only in the replicas that call them, so the driver that builds the graph needs none.
    """
    load_experts = load_experts or {}
    r = library.router
    router = RouterDeployment.options(**r.serve_options(library.ingress)).bind(
        encoder=r.model,
        checkpoint=str(r.checkpoint),
        load=load_router,
        revision=r.revision,
        threads=r.threads,
    )
    pooled = _pools(library, load_experts)
    experts = {
        e.name: pooled.get(e.name) or _expert(e, library, load_experts) for e in library.experts
    }
    # The API keys reach the ingress as digests: Serve's REST API shows runtime environments.
    digests = ",".join(key_digest(k) for k in Guard.keys_from(os.environ.get(API_KEYS_ENV)))
    ingress = library.ingress.serve_options({API_KEY_DIGESTS_ENV: digests} if digests else None)
    return Ingress.options(**ingress).bind(library, router, experts)
