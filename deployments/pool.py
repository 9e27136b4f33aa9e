"""A long-tail pool: one multiplexed deployment serving many experts, loaded on demand.

Requests carry their expert's name as the multiplexed model id (the ingress sets it), so Serve
sends them to a replica that already holds that expert when one does. A replica keeps at most
`max_models_per_replica` experts and evicts the least recently used to load another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray import serve

from serve_app.config import EXPERT_BATCHING
from serve_app.experts import Filled, Generation, HFExpert, Score, load_expert
from serve_app.protocol import ExpertRequest, Failure
from serve_app.serving import ExpertCalls, rss_bytes

logger = logging.getLogger("ray.serve")


class _Resident:
    """An expert loaded in this replica. Serve's multiplexer calls the instance's `__del__`
    when it evicts the expert (an instance attribute: the garbage collector never calls it)."""

    def __init__(self, engine: HFExpert, on_evict: Callable[[], None]):
        self.engine = engine
        self.__del__ = on_evict


@serve.deployment(ray_actor_options={"num_cpus": 0})
class PoolDeployment(ExpertCalls):
    """A pool's replica group; `build_app` names it "Pool-<pool name>".

    `experts` maps each pooled expert's name to how it loads: {"model", "task", "revision"}.
    `loads` replaces the model loader per expert (tests bind tiny or failing engines)."""

    def __init__(
        self,
        experts: dict[str, dict[str, Any]],
        max_models_per_replica: int,
        load: Callable[..., HFExpert] = load_expert,
        loads: dict[str, Callable[..., HFExpert]] | None = None,
    ):
        self.experts = experts
        self.load = load
        self.loads = loads or {}
        self.fault: str | None = None
        self.streaming = 0
        self.requests = 0  # requests served; those that waited for their expert to load
        self.misses = 0
        self.loaded = 0  # loads and evictions
        self.evicted = 0
        self.resident: list[str] = []  # experts held now, least recently loaded first
        self.load_s: list[float] = []  # the most recent loads' durations

        async def engine(name: str) -> _Resident:
            return await self._load(name)

        # Wired here, not as a decorator: the cache size is the library's to set.
        self._engine = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(engine)

    async def _load(self, name: str) -> _Resident:
        spec = self.experts[name]  # the ingress only sends this pool's experts
        load = self.loads.get(name, self.load)
        args = (spec["model"], spec["task"]) + ((spec["revision"],) if spec.get("revision") else ())
        start = time.perf_counter()
        engine = await asyncio.to_thread(load, *args)
        self.load_s = [*self.load_s[-99:], time.perf_counter() - start]
        self.loaded += 1
        self.resident.append(name)

        def evict() -> None:
            self.evicted += 1
            self.resident.remove(name)

        return _Resident(engine, evict)

    async def _on_engine(self, run: Callable[[HFExpert, list], list], items: list) -> list:
        """`run(engine, items)` on a thread with the engine of the batch's expert; each item
        gets the Failure when that expert cannot be loaded."""
        engine = await self._engine_for(len(items))
        if isinstance(engine, Failure):
            return [engine] * len(items)
        return await asyncio.to_thread(run, engine, items)

    async def _engine_for(self, n: int) -> HFExpert | Failure:
        """The engine of the expert this batch (all for one expert) asks for."""
        name = serve.get_multiplexed_model_id()
        self.requests += n
        if name not in self.experts:
            return Failure(message=f"expert {name!r} is not in this pool")
        if name not in self.resident:
            self.misses += n
        try:
            return (await self._engine(name)).engine
        except Exception as err:
            self._noticed(err)
            logger.exception("pooled expert %s could not be loaded", name, exc_info=err)
            return Failure(message=f"{type(err).__name__} while loading expert {name!r}")

    # Serve splits every batch by multiplexed model id: a batch is for one expert.

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def generate(self, requests: list[ExpertRequest]) -> list[Generation | Failure]:
        """Continue prompts (or chats) on the requested expert."""
        return await self._on_engine(self._generate, requests)

    async def generate_stream(
        self, request: ExpertRequest
    ) -> AsyncIterator[str | Generation | Failure]:
        """Continue one prompt on the requested expert, yielding text as it is decoded."""
        engine = await self._engine_for(1)
        if isinstance(engine, Failure):
            yield engine
            return
        async for item in self._stream(engine, request):
            yield item

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def fill_mask(self, requests: list[ExpertRequest]) -> list[Filled | Failure]:
        """Top predictions for each mask of each prompt, on the requested expert."""
        return await self._on_engine(self._fill_mask, requests)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def score(self, texts: list[str]) -> list[Score | Failure]:
        """Loss of each text under the requested expert (bits per UTF-8 byte)."""
        return await self._on_engine(self._score, texts)

    async def info(self) -> dict[str, Any]:
        """This replica: the experts it holds, its requests (and those that waited for a load:
        misses), loads and evictions, the recent
        loads' durations, its resident memory."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "experts": list(self.resident),
            "requests": self.requests,
            "misses": self.misses,
            "loads": self.loaded,
            "evictions": self.evicted,
            "load_s": list(self.load_s),
            "rss_bytes": rss_bytes(),
            "ray_gpu_ids": ray.get_gpu_ids(),
            "streaming": self.streaming,
        }
