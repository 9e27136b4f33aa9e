"""One expert deployment: a model that generates (or fills masks) and scores text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from itertools import groupby
from typing import Any

import ray
from ray import serve

from serve_app.config import EXPERT_BATCHING, Batching
from serve_app.experts import Filled, Generation, HFExpert, Score, load_expert
from serve_app.protocol import ExpertRequest


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertDeployment:
    """An expert's replica group; `build_app` names it after the expert."""

    def __init__(self, model: str, task: str, load: Callable[[str, str], HFExpert] = load_expert):
        self.task = task
        start = time.perf_counter()
        self.engine = load(model, task)
        self.load_s = time.perf_counter() - start  # model load, the part of a cold start we own

    def reconfigure(self, config: dict) -> None:
        """Apply `user_config`: the batch size and wait of every batched method."""
        batching = Batching.model_validate(config)
        for method in (self.generate, self.fill_mask, self.score):
            method.set_max_batch_size(batching.max_batch_size)
            method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def generate(self, requests: list[ExpertRequest]) -> list[Generation]:
        """Continue prompts (or chats); requests that share settings share a forward pass."""

        def run(settings: tuple, group: list[ExpertRequest]) -> list[Generation]:
            return self.engine.generate([self._prompt(r) for r in group], *settings)

        return await asyncio.to_thread(_by_settings, requests, _gen_settings, run)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def fill_mask(self, requests: list[ExpertRequest]) -> list[Filled]:
        """Top predictions for each mask of each prompt."""

        def run(settings: tuple, group: list[ExpertRequest]) -> list[Filled]:
            return self.engine.fill_mask([r.prompt for r in group], *settings)

        return await asyncio.to_thread(_by_settings, requests, lambda r: (r.top_k,), run)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def score(self, texts: list[str]) -> list[Score]:
        """Loss of each text (Score.bpb: bits per UTF-8 byte, with the bits, bytes, tokens)."""
        return await asyncio.to_thread(self.engine.score, texts)

    async def info(self) -> dict[str, Any]:
        """What this replica runs on (the device torch picked, the GPU ids Ray assigned) and how
        long its model took to load."""
        return {
            "task": self.task,
            "device": str(getattr(self.engine, "device", None)),
            "ray_gpu_ids": ray.get_gpu_ids(),
            "load_s": self.load_s,
        }

    def _prompt(self, request: ExpertRequest) -> str:
        """The request's prompt; a chat becomes the tokenizer's chat template or a transcript."""
        if request.messages is None:
            return request.prompt or ""
        messages = request.messages
        tok = getattr(self.engine, "tokenizer", None)
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


def _gen_settings(request: ExpertRequest) -> tuple:
    return request.generation_settings()


def _by_settings(
    requests: list[ExpertRequest],
    settings: Callable[[ExpertRequest], tuple],
    run: Callable[[tuple, list[ExpertRequest]], list[Any]],
) -> list[Any]:
    """Run a batch as sub-batches of requests that share settings; answers in request order."""
    out: list[Any] = [None] * len(requests)
    key = lambda i: settings(requests[i])  # noqa: E731
    for shared, group in groupby(sorted(range(len(requests)), key=key), key=key):
        idx = list(group)
        for i, answer in zip(idx, run(shared, [requests[i] for i in idx]), strict=True):
            out[i] = answer
    return out
