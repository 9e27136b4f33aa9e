"""A remote expert: an OpenAI-compatible server elsewhere (vLLM, TGI, a hosted API, another
tryage), called with the official `openai` async client. Its replicas hold no accelerator."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from ray import serve

from serve_app.answers import Generation
from serve_app.protocol import ExpertRequest, Failure


@serve.deployment(ray_actor_options={"num_cpus": 0})
class RemoteExpertDeployment:
    """The same calls as ExpertDeployment's text-generation ones, answered by a remote server
    through its chat or completions API."""

    def __init__(self, model: str, base_url: str, api_key_env: str | None, timeout_s: float):
        from openai import AsyncOpenAI

        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.model = model
        # Retries are the ingress's to decide (the next expert in the ranking), not the client's.
        self.client = AsyncOpenAI(
            base_url=base_url, api_key=key or "none", timeout=timeout_s, max_retries=0
        )

    def reconfigure(self, config: dict) -> None:
        """`user_config` carries batching settings; calls to a server are not batched here (the
        server batches), so there is nothing to apply."""

    def _args(self, request: ExpertRequest) -> dict:
        args = {
            "model": self.model,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:  # the server ends the answer before them, as OpenAI's API does
            args["stop"] = list(request.stop)
        return args | ({"seed": request.seed} if request.temperature else {})

    async def generate(self, request: ExpertRequest) -> Generation | Failure:
        """One answer from the server, as a Generation with the server's usage."""
        from openai import BadRequestError

        try:
            if request.messages is not None:
                done = await self.client.chat.completions.create(
                    messages=request.messages, **self._args(request)
                )
                text = done.choices[0].message.content or ""
            else:
                done = await self.client.completions.create(
                    prompt=request.prompt or "", **self._args(request)
                )
                text = done.choices[0].text
        except BadRequestError as err:  # the server refused this request: the client's fault
            return Failure(
                message=f"the remote expert refused the request: {err.message}", client=True
            )
        usage = done.usage
        return Generation(
            text=text,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=done.choices[0].finish_reason or "stop",
            max_new_tokens=request.max_new_tokens,
        )

    async def generate_stream(
        self, request: ExpertRequest
    ) -> AsyncIterator[str | Generation | Failure]:
        """The server's stream, piece by piece, then the whole answer as a Generation."""
        from openai import BadRequestError

        options = {"stream": True, "stream_options": {"include_usage": True}}
        try:
            if request.messages is not None:
                stream = await self.client.chat.completions.create(
                    messages=request.messages, **self._args(request), **options
                )
            else:
                stream = await self.client.completions.create(
                    prompt=request.prompt or "", **self._args(request), **options
                )
        except BadRequestError as err:
            yield Failure(
                message=f"the remote expert refused the request: {err.message}", client=True
            )
            return
        parts: list[str] = []
        finish, usage = "stop", None
        async with stream:
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    text = choice.delta.content if hasattr(choice, "delta") else choice.text
                    finish = choice.finish_reason or finish
                    if text:
                        parts.append(text)
                        yield text
        yield Generation(
            text="".join(parts),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else len(parts),
            finish_reason=finish,
            max_new_tokens=request.max_new_tokens,
        )
