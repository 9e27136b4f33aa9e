"""What an expert replica does with an engine, shared by an expert's own deployment and a pool's.

Each call answers every request on its own (serve_app.batch): one request that fails gets a
Failure in its place, the rest of the batch their answers. The engine is an argument, so a
pool replica runs the same code on whichever expert a batch is for.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from serve_app.answers import Filled, Generation, Score
from serve_app.batch import DeviceHealth, isolated
from serve_app.config import Batching
from serve_app.protocol import ExpertRequest, Failure

if TYPE_CHECKING:
    from serve_app.experts import HFExpert


class ExpertCalls(DeviceHealth):
    """Generation, streaming, fill-mask and scoring on a given engine, for a deployment."""

    streaming = 0  # streamed generations still running (info() reports it)

    def _batched(self) -> tuple:
        """The deployment's `@serve.batch` methods."""
        return (self.generate, self.fill_mask, self.score)  # type: ignore[attr-defined]

    def reconfigure(self, config: dict) -> None:
        """Apply `user_config`: the batch size and wait of every batched method."""
        batching = Batching.model_validate(config)
        for method in self._batched():
            method.set_max_batch_size(batching.max_batch_size)
            method.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def _generate(
        self, engine: HFExpert, requests: list[ExpertRequest]
    ) -> list[Generation | Failure]:
        # A prompt that cannot be rendered (a chat template refusing the messages) is the
        # request's own fault: it fails alone, as a client error, and never reaches the model.
        prompts: dict[int, tuple[str, bool]] = {}
        out: list[Generation | Failure | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                prompts[i] = _prompt(engine, request)
            except Exception as err:
                out[i] = Failure(message=f"the chat cannot be rendered: {err}", client=True)
        todo = [i for i in range(len(requests)) if out[i] is None]

        def settings(i: int) -> tuple:  # templated chats and plain prompts run apart
            return (*requests[i].generation_settings(), prompts[i][1])

        def run(shared: tuple, group: list[int]) -> list[Generation]:
            new_tokens, temperature, top_p, stop, chat = shared
            return engine.generate(
                [prompts[i][0] for i in group],
                new_tokens,
                temperature,
                top_p,
                [requests[i].seed for i in group],
                stop,
                [requests[i].deadline for i in group],  # each row stops at its own
                chat=chat,
            )

        answers = isolated(todo, settings, run, self._noticed)
        for i, answer in zip(todo, answers, strict=True):
            out[i] = answer
        return out  # type: ignore[return-value]

    async def _stream(
        self, engine: HFExpert, request: ExpertRequest
    ) -> AsyncIterator[str | Generation | Failure]:
        """Continue one prompt, yielding text as it is decoded, then the whole Generation.
        A request that cannot start yields one Failure. When the caller goes away (the client
        disconnected), the generation stops at its next token."""
        try:
            prompt, chat = _prompt(engine, request)
        except Exception as err:
            yield Failure(message=f"the chat cannot be rendered: {err}", client=True)
            return
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        new_tokens, temperature, top_p, stop = request.generation_settings()

        def work() -> None:
            self.streaming += 1
            try:
                stream = engine.stream(
                    prompt,
                    new_tokens,
                    temperature,
                    top_p,
                    request.seed,
                    stop,
                    request.deadline,
                    cancel,
                    chat=chat,
                )
                for item in stream:
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
            cancel.set()  # a cancelled stream (the client left) stops the model at its next token

    def _fill_mask(self, engine: HFExpert, requests: list[ExpertRequest]) -> list[Filled | Failure]:
        def run(settings: tuple, group: list[ExpertRequest]) -> list[Filled]:
            return engine.fill_mask([r.prompt for r in group], *settings)

        return isolated(requests, lambda r: (r.top_k,), run, self._noticed)

    def _score(self, engine: HFExpert, texts: list[str]) -> list[Score | Failure]:
        run = lambda _, group: engine.score(group)  # noqa: E731
        return isolated(texts, lambda _: (), run, self._noticed)


def _prompt(engine: HFExpert, request: ExpertRequest) -> tuple[str, bool]:
    """The request's prompt, and whether the expert's chat template wrote it (then it holds
    its own special tokens); a chat is rendered with the template (or as a plain transcript),
    message text unable to forge a role (serve_app.experts)."""
    if request.messages is None:
        return request.prompt or "", False
    from serve_app.experts import has_template, render_chat

    return render_chat(engine.tokenizer, request.messages), has_template(engine.tokenizer)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
