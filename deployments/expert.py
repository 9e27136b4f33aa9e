"""One expert deployment: a model that generates (or fills masks) and scores text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict
from itertools import groupby
from typing import Any

import ray
from ray import serve

from serve_app.experts import HFExpert, load_expert


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
        size = int(config.get("max_batch_size", 8))
        wait = float(config.get("batch_wait_timeout_s", 0.01))
        for method in (self.generate, self.fill_mask, self.score):
            method.set_max_batch_size(size)
            method.set_batch_wait_timeout_s(wait)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Continue prompts. Each request: prompt (or chat messages), max_new_tokens,
        temperature, top_p, seed."""

        def run(settings: tuple, group: list[dict[str, Any]]) -> list[dict[str, Any]]:
            gens = self.engine.generate([self._prompt(r) for r in group], *settings)
            return [asdict(g) for g in gens]

        return await asyncio.to_thread(_by_settings, requests, _gen_settings, run)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def fill_mask(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Top predictions for each mask of each prompt. Each request: prompt, top_k."""

        def run(settings: tuple, group: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return self.engine.fill_mask([r["prompt"] for r in group], *settings)

        settings = lambda r: (int(r.get("top_k") or 5),)  # noqa: E731
        return await asyncio.to_thread(_by_settings, requests, settings, run)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score(self, texts: list[str]) -> list[dict[str, float]]:
        """Loss of each text in bits per UTF-8 byte, with the bits, bytes and tokens behind it."""
        scores = await asyncio.to_thread(self.engine.score, texts)
        return [{**asdict(s), "bpb": s.bpb} for s in scores]

    async def info(self) -> dict[str, Any]:
        """What this replica runs on (the device torch picked, the GPU ids Ray assigned) and how
        long its model took to load."""
        return {
            "task": self.task,
            "device": str(getattr(self.engine, "device", None)),
            "ray_gpu_ids": ray.get_gpu_ids(),
            "load_s": self.load_s,
        }

    def _prompt(self, request: dict[str, Any]) -> str:
        """The request's prompt; a chat becomes the tokenizer's chat template or a transcript."""
        if "messages" not in request:
            return request["prompt"]
        messages = request["messages"]
        tok = getattr(self.engine, "tokenizer", None)
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


def _gen_settings(request: dict[str, Any]) -> tuple:
    return (
        int(request["max_new_tokens"]),
        float(request.get("temperature") or 0.0),
        float(request.get("top_p") or 1.0),
        int(request.get("seed") or 0),
    )


def _by_settings(
    requests: list[dict[str, Any]],
    settings: Callable[[dict[str, Any]], tuple],
    run: Callable[[tuple, list[dict[str, Any]]], list[Any]],
) -> list[Any]:
    """Run a batch as sub-batches of requests that share settings; answers in request order."""
    out: list[Any] = [None] * len(requests)
    key = lambda i: settings(requests[i])  # noqa: E731
    for shared, group in groupby(sorted(range(len(requests)), key=key), key=key):
        idx = list(group)
        for i, answer in zip(idx, run(shared, [requests[i] for i in idx]), strict=True):
            out[i] = answer
    return out
