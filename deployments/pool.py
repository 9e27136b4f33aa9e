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
from typing import TYPE_CHECKING, Any

import ray
from ray import serve

from serve_app.answers import Filled, Generation, Score
from serve_app.config import EXPERT_BATCHING
from serve_app.loaders import load_expert
from serve_app.protocol import ExpertRequest, Failure
from serve_app.serving import ExpertCalls, rss_bytes

if TYPE_CHECKING:
    from serve_app.experts import HFExpert

logger = logging.getLogger("ray.serve")
#: After a pooled expert fails to load, requests for it fail at once (and fall back) for this
#: long before a replica tries the load again.
LOAD_RETRY_S = 30.0


class _Resident:
    """An expert loaded in this replica. Serve's multiplexer awaits the instance's `__del__`
    when it evicts the expert (an instance attribute: the garbage collector never calls it)."""

    def __init__(self, engine: HFExpert, on_evict: Callable[[], Any]):
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

        self.failed: dict[str, tuple[float, Failure]] = {}  # loads that failed, and when

        async def engine(name: str) -> _Resident:
            return await self._load(name)

        # Wired here, not as a decorator: the cache size is the library's to set.
        self._engine = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(engine)

    async def _load(self, name: str) -> _Resident:
        spec = self.experts[name]  # checked by _ready
        load = self.loads.get(name, self.load)
        args = (spec["model"], spec["task"]) + ((spec["revision"],) if spec.get("revision") else ())
        start = time.perf_counter()
        engine = await asyncio.to_thread(load, *args)
        self.load_s = [*self.load_s[-99:], time.perf_counter() - start]
        self.loaded += 1
        self.resident.append(name)

        async def evict() -> None:  # awaited on the event loop: no window where counts lag
            self.evicted += 1
            self.resident.remove(name)

        return _Resident(engine, evict)

    async def _ready(self, n: int) -> Failure | None:
        """Load the requested expert, if it is not held, before its requests join a batch, so
        a load never holds up the batches of experts already loaded. A Failure when the expert
        is not in this pool or failed to load within the last LOAD_RETRY_S seconds (then the
        ingress falls back without this replica trying, and evicting for, the load again)."""
        name = serve.get_multiplexed_model_id()
        self.requests += n
        if name not in self.experts:
            return Failure(message=f"expert {name!r} is not in this pool")
        failed = self.failed.get(name)
        if failed and time.monotonic() - failed[0] < LOAD_RETRY_S:
            return failed[1]
        if name not in self.resident:
            self.misses += n
        try:
            await self._engine(name)
        except Exception as err:  # the expert's fault, not the device's: no health failure
            logger.exception("pooled expert %s could not be loaded", name, exc_info=err)
            failure = Failure(message=f"{type(err).__name__} while loading expert {name!r}")
            self.failed[name] = (time.monotonic(), failure)
            return failure
        self.failed.pop(name, None)
        return None

    async def _on_engine(self, run: Callable[[HFExpert, list], list], items: list) -> list:
        """`run(engine, items)` on a thread with the engine of the batch's expert (loaded by
        _ready; loaded again here only if it was evicted in between)."""
        try:
            engine = (await self._engine(serve.get_multiplexed_model_id())).engine
        except Exception as err:
            logger.exception("a pooled expert could not be reloaded", exc_info=err)
            return [Failure(message=f"{type(err).__name__} while loading the expert")] * len(items)
        return await asyncio.to_thread(run, engine, items)

    async def _answer(self, batched: Callable[[Any], Any], item: Any) -> Any:
        """The expert loaded first (_ready), then `item` through its batched method."""
        failure = await self._ready(1)
        return failure if failure is not None else await batched(item)

    def _batched(self) -> tuple:
        return (self._generate_batch, self._fill_mask_batch, self._score_batch)

    # Serve splits every batch by multiplexed model id: a batch is for one expert.

    async def generate(self, request: ExpertRequest) -> Generation | Failure:
        """Continue a prompt (or chat) on the requested expert."""
        return await self._answer(self._generate_batch, request)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def _generate_batch(self, requests: list[ExpertRequest]) -> list[Generation | Failure]:
        return await self._on_engine(self._generate, requests)

    async def generate_stream(
        self, request: ExpertRequest
    ) -> AsyncIterator[str | Generation | Failure]:
        """Continue one prompt on the requested expert, yielding text as it is decoded."""
        failure = await self._ready(1)
        if failure is not None:
            yield failure
            return
        engine = (await self._engine(serve.get_multiplexed_model_id())).engine
        async for item in self._stream(engine, request):
            yield item

    async def fill_mask(self, request: ExpertRequest) -> Filled | Failure:
        """Top predictions for each mask of the prompt, on the requested expert."""
        return await self._answer(self._fill_mask_batch, request)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def _fill_mask_batch(self, requests: list[ExpertRequest]) -> list[Filled | Failure]:
        return await self._on_engine(self._fill_mask, requests)

    async def score(self, text: str) -> Score | Failure:
        """Loss of a text under the requested expert (bits per UTF-8 byte)."""
        return await self._answer(self._score_batch, text)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def _score_batch(self, texts: list[str]) -> list[Score | Failure]:
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
