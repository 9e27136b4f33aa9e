"""One expert deployment: a model that generates (or fills masks) and scores text."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray import serve

from serve_app.batch import DeviceHealth, isolated
from serve_app.config import EXPERT_BATCHING, Batching
from serve_app.experts import Filled, Generation, HFExpert, Score, load_expert, render_chat
from serve_app.protocol import ExpertRequest, Failure


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ExpertDeployment(DeviceHealth):
    """An expert's replica group; `build_app` names it after the expert.

    Every batched method answers each request on its own (serve_app.batch): one request that
    fails gets a Failure in its place, the rest of the batch its answers."""

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
        self.streaming = 0  # streamed generations still running (info() reports it)

    def reconfigure(self, config: dict) -> None:
        """Apply `user_config`: the batch size and wait of every batched method."""
        batching = Batching.model_validate(config)
        for method in (self.generate, self.fill_mask, self.score):
            method.set_max_batch_size(batching.max_batch_size)
            method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def generate(self, requests: list[ExpertRequest]) -> list[Generation | Failure]:
        """Continue prompts (or chats); requests that share settings share a forward pass."""
        return await asyncio.to_thread(self._generate, requests)

    def _generate(self, requests: list[ExpertRequest]) -> list[Generation | Failure]:
        # A prompt that cannot be rendered (a chat template refusing the messages) is the
        # request's own fault: it fails alone, as a client error, and never reaches the model.
        prompts: dict[int, str] = {}
        out: list[Generation | Failure | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                prompts[i] = self._prompt(request)
            except Exception as err:
                out[i] = Failure(message=f"the chat cannot be rendered: {err}", client=True)
        todo = [i for i in range(len(requests)) if out[i] is None]

        def run(settings: tuple, group: list[int]) -> list[Generation]:
            deadline = min((d for i in group if (d := requests[i].deadline)), default=None)
            return self.engine.generate([prompts[i] for i in group], *settings, deadline)

        answers = isolated(todo, lambda i: requests[i].generation_settings(), run, self._noticed)
        for i, answer in zip(todo, answers, strict=True):
            out[i] = answer
        return out  # type: ignore[return-value]

    async def generate_stream(
        self, request: ExpertRequest
    ) -> AsyncIterator[str | Generation | Failure]:
        """Continue one prompt, yielding text as it is decoded, then the whole Generation.
        A request that cannot start yields one Failure. When the caller goes away (the client
        disconnected), the generation stops at its next token."""
        try:
            prompt = self._prompt(request)
        except Exception as err:
            yield Failure(message=f"the chat cannot be rendered: {err}", client=True)
            return
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        settings = request.generation_settings()

        def work() -> None:
            self.streaming += 1
            try:
                for item in self.engine.stream(prompt, *settings, request.deadline, stop):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as err:
                self._noticed(err)
                failure = Failure(message=f"{type(err).__name__} while generating")
                loop.call_soon_threadsafe(queue.put_nowait, failure)
            finally:
                self.streaming -= 1
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            stop.set()  # a cancelled stream (the client left) stops the model at its next token

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def fill_mask(self, requests: list[ExpertRequest]) -> list[Filled | Failure]:
        """Top predictions for each mask of each prompt."""

        def run(settings: tuple, group: list[ExpertRequest]) -> list[Filled]:
            return self.engine.fill_mask([r.prompt for r in group], *settings)

        return await asyncio.to_thread(isolated, requests, lambda r: (r.top_k,), run, self._noticed)

    @serve.batch(**EXPERT_BATCHING.model_dump())
    async def score(self, texts: list[str]) -> list[Score | Failure]:
        """Loss of each text (Score.bpb: bits per UTF-8 byte, with the bits, bytes, tokens)."""
        run = lambda _, group: self.engine.score(group)  # noqa: E731
        return await asyncio.to_thread(isolated, texts, lambda _: (), run, self._noticed)

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

    def _prompt(self, request: ExpertRequest) -> str:
        """The request's prompt; a chat is rendered with the expert's chat template (or a
        plain transcript), message text unable to forge a role (serve_app.experts)."""
        if request.messages is None:
            return request.prompt or ""
        return render_chat(self.engine.tokenizer, request.messages)
