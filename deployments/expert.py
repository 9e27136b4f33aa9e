"""One expert deployment: a model that generates (or fills masks) and scores text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import ray
from ray import serve

from serve_app.answers import Filled, Generation, Score
from serve_app.config import EXPERT_BATCHING
from serve_app.loaders import load_expert
from serve_app.protocol import ExpertRequest, Failure
from serve_app.serving import ExpertCalls

if TYPE_CHECKING:
    from serve_app.experts import HFExpert


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertDeployment(ExpertCalls):
    """An expert's replica group; `build_app` names it after the expert.

    Every batched method answers each request on its own (serve_app.serving): one request
    that fails gets a Failure in its place, the rest of the batch its answers."""

    def __init__(
        self,
        model: str,
        task: str,
        load: Callable[..., HFExpert] = load_expert,
        revision: str | None = None,
    ):
        self.task = task
        start = time.perf_counter()
        self.engine = load(model, task) if revision is None else load(model, task, revision)
        self.load_s = time.perf_counter() - start  # model load, the part of a cold start we own
        self.fault: str | None = None  # set when the device broke: check_health reports it
        self.streaming = 0

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def generate(self, requests: list[ExpertRequest]) -> list[Generation | Failure]:
        """Continue prompts (or chats); requests that share settings share a forward pass."""
        # A thread keeps the replica's event loop free (health checks, queueing the next batch).
        return await asyncio.to_thread(self._generate, self.engine, requests)

    async def generate_stream(
        self, request: ExpertRequest
    ) -> AsyncIterator[str | Generation | Failure]:
        """Continue one prompt, yielding text as it is decoded, then the whole Generation."""
        async for item in self._stream(self.engine, request):
            yield item

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def fill_mask(self, requests: list[ExpertRequest]) -> list[Filled | Failure]:
        """Top predictions for each mask of each prompt."""
        return await asyncio.to_thread(self._fill_mask, self.engine, requests)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def score(self, texts: list[str]) -> list[Score | Failure]:
        """Loss of each text (Score.bpb: bits per UTF-8 byte, with the bits, bytes, tokens)."""
        return await asyncio.to_thread(self._score, self.engine, texts)

    async def info(self) -> dict[str, Any]:
        """What this replica runs on (the device torch picked, the GPU ids Ray assigned) and how
        long its model took to load."""
        return {
            "task": self.task,
            "device": str(getattr(self.engine, "device", None)),
            "ray_gpu_ids": ray.get_gpu_ids(),
            "load_s": self.load_s,
            "streaming": self.streaming,
        }
