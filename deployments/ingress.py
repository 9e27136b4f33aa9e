"""The composition node: HTTP ingress that asks the router, evaluates the objective and
sends the prompt to the chosen expert only (falling back down the ranking if it fails)."""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime to know that a pydantic model is the request body.
import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app import objective
from serve_app.api import create_api
from serve_app.config import LibraryConfig
from serve_app.errors import BadRequest, NoExpertAvailable, Overloaded, UnknownExpert
from serve_app.experts import Generation, has_mask
from serve_app.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ExpertRequest,
    Health,
    InferRequest,
    InferResponse,
    ModelCard,
    ModelList,
    RankedOut,
    RouteRequest,
    RouteResponse,
    Usage,
)

logger = logging.getLogger("ray.serve")
api = create_api()


def _ranking(ranking: list[objective.Ranked]) -> list[RankedOut]:
    return [RankedOut(**r.as_dict()) for r in ranking]


def _usage(gen: Generation) -> Usage:
    """OpenAI's usage: tokens of the expert that answered."""
    total = gen.prompt_tokens + gen.completion_tokens
    return Usage(
        prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens, total_tokens=total
    )


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Routes and dispatches; holds one handle per expert deployment."""

    def __init__(
        self,
        library: LibraryConfig,
        router: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
    ):
        self.library = library
        self.router = router
        self.experts = experts
        self.penalties = objective.penalties(library.experts)
        self.limits = library.ingress
        self.task_of = {e.name: e.task for e in library.experts}

    # routing ----------------------------------------------------------------------------------

    def _clean(self, prompt: str) -> tuple[str, dict[str, float]]:
        """Check the prompt's length and strip its flags."""
        if not prompt.strip():
            raise BadRequest("prompt is empty", "prompt")
        if len(prompt) > self.limits.max_prompt_chars:
            raise BadRequest(
                f"prompt has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}",
                "prompt",
            )
        clean, flags = objective.parse_flags(prompt)
        if not clean:
            raise BadRequest("prompt is empty once its [flag: ...] markers are removed", "prompt")
        return clean, flags

    async def _rank(
        self, text: str, flags: dict, weights: dict | None, allow: list | None, task: str | None
    ) -> list[objective.Ranked]:
        """Eligible experts, predicted losses and the objective: the routing decision."""
        merged = objective.merge_weights(self.library.objective.weights, weights, flags)
        names = objective.eligible(self.library.experts, allow, task)
        if not has_mask(text):  # a masked LM has nothing to fill without a [MASK]
            names = [n for n in names if self.library.expert(n).task != "fill-mask"]
            if not names:
                raise BadRequest("fill-mask experts need a [MASK] in the prompt", "prompt")
        try:
            predicted = await self.router.predict.remote(text)
        except BackPressureError as err:
            raise Overloaded(
                "the router is at its queue limit; retry shortly",
                status=err.status_code,
                retry_after_s=err.retry_after_s,
            ) from None
        except Exception as err:
            logger.exception("router failed", exc_info=err)
            raise NoExpertAvailable("the router is unavailable; retry shortly") from None
        return objective.rank(predicted, self.penalties, merged, names)

    async def _dispatch(
        self, ranking: list[objective.Ranked], call: Callable[[str], DeploymentResponse]
    ) -> tuple[str, Any, list[str]]:
        """Run `call` on the best expert; on failure or timeout the next, up to max_attempts."""
        skipped: list[str] = []
        busy: BackPressureError | None = None
        for ranked in ranking[: self.limits.max_attempts]:
            response = call(ranked.expert)
            try:
                answer = await asyncio.wait_for(response, self.limits.expert_timeout_s)
                return ranked.expert, answer, skipped
            except BackPressureError as err:
                # The expert's queue is full (its max_queued_requests): the next one answers.
                logger.info("expert %s is at its queue limit; trying the next", ranked.expert)
                busy = err
            except TimeoutError:
                response.cancel()
                logger.error(
                    "expert %s gave no answer in %.0f s; trying the next",
                    ranked.expert,
                    self.limits.expert_timeout_s,
                )
            except Exception as err:
                logger.exception("expert %s failed; trying the next", ranked.expert, exc_info=err)
            skipped.append(ranked.expert)
        if busy is not None:
            raise Overloaded(
                f"the experts that could answer are busy ({', '.join(skipped)}); retry shortly",
                status=busy.status_code,
                retry_after_s=busy.retry_after_s,
            )
        raise NoExpertAvailable(f"every expert tried failed ({', '.join(skipped)}); retry shortly")

    def _new_tokens(self, asked: int | None) -> int:
        n = asked or self.limits.default_new_tokens
        if n > self.limits.max_new_tokens:
            raise BadRequest(
                f"max_new_tokens {n} is over the limit {self.limits.max_new_tokens}",
                "max_new_tokens",
            )
        return n

    def _on_expert(self, payload: ExpertRequest) -> Callable[[str], DeploymentResponse]:
        """A call that runs `payload` on a named expert, by the expert's task."""

        def call(name: str) -> DeploymentResponse:
            handle = self.experts[name]
            if self.task_of[name] == "fill-mask":
                return handle.fill_mask.remote(payload)
            return handle.generate.remote(payload)

        return call

    # endpoints -------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> Health:
        return Health()

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=e.name,
                    task=e.task,
                    params=e.params,
                    released=e.released.isoformat(),
                    description=e.description,
                    trusted=e.trusted,
                )
                for e in self.library.experts
            ]
        )

    @api.post("/v1/route")
    async def route(self, body: RouteRequest) -> RouteResponse:
        text, flags = self._clean(body.prompt)
        ranking = await self._rank(text, flags, body.weights, body.experts, body.task)
        return RouteResponse(expert=ranking[0].expert, ranking=_ranking(ranking))

    @api.post("/v1/infer")
    async def infer(self, body: InferRequest, response: Response) -> InferResponse:
        text, flags = self._clean(body.prompt)
        ranking = await self._rank(text, flags, body.weights, body.experts, body.task)
        payload = ExpertRequest(
            prompt=text,
            max_new_tokens=self._new_tokens(body.max_new_tokens),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            top_k=body.top_k,
        )
        expert, output, skipped = await self._dispatch(ranking, self._on_expert(payload))
        task = self.task_of[expert]
        response.headers["x-tryage-expert"] = expert
        return InferResponse(
            expert=expert,
            task=task,
            output=output.text if task == "text-generation" else asdict(output),
            ranking=_ranking(ranking),
            skipped=skipped,
        )

    async def _openai(
        self, body: Any, raw: str, build: Callable[[str], ExpertRequest], response: Response
    ) -> tuple[str, Generation]:
        """Route (or pin) an OpenAI request among text-generation experts and run it.

        `raw` is the text routed on (the prompt, or the last user message); `build` makes the
        expert's request from it once its flags are stripped.
        """
        if body.stream:
            raise BadRequest("stream=true is not supported; send stream=false", "stream")
        text, flags = self._clean(raw)
        opts = body.tryage
        allow = opts.experts if opts else None
        if body.model != "tryage":
            if body.model not in self.experts:
                known = ", ".join(["tryage", *self.experts])
                raise UnknownExpert(f"unknown model {body.model!r}; known: {known}", "model")
            allow = [body.model]
        weights = opts.weights if opts else None
        ranking = await self._rank(text, flags, weights, allow, "text-generation")
        expert, gen, _ = await self._dispatch(ranking, self._on_expert(build(text)))
        response.headers["x-tryage-expert"] = expert
        return expert, gen

    def _settings(self, body: Any, max_tokens: int | None) -> dict:
        """Generation settings of an OpenAI request."""
        return {
            "max_new_tokens": self._new_tokens(max_tokens or self.limits.openai_default_max_tokens),
            "temperature": body.temperature or 0.0,
            "top_p": body.top_p or 1.0,
            "seed": body.seed or 0,
        }

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, response: Response) -> Completion:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise BadRequest("send exactly one prompt per request", "prompt")
        settings = self._settings(body, body.max_tokens)
        expert, gen = await self._openai(
            body, prompts[0], lambda text: ExpertRequest(prompt=text, **settings), response
        )
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=expert,
            choices=[CompletionChoice(text=gen.text, finish_reason=gen.finish_reason)],
            usage=_usage(gen),
        )

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, response: Response) -> ChatCompletion:
        users = [i for i, m in enumerate(body.messages) if m.role == "user"]
        if not users:
            raise BadRequest("messages need at least one user message", "messages")
        size = sum(len(m.content) for m in body.messages)
        if size > self.limits.max_prompt_chars:
            raise BadRequest(
                f"messages have {size} characters; the limit is {self.limits.max_prompt_chars}",
                "messages",
            )
        settings = self._settings(body, body.max_completion_tokens or body.max_tokens)

        def build(text: str) -> ExpertRequest:
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            messages[users[-1]]["content"] = text  # the routed message, flags stripped
            return ExpertRequest(messages=messages, **settings)

        expert, gen = await self._openai(body, body.messages[users[-1]].content, build, response)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=expert,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=gen.text), finish_reason=gen.finish_reason
                )
            ],
            usage=_usage(gen),
        )
