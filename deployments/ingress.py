"""The composition node: HTTP ingress that asks the router, evaluates the objective and
sends the prompt to the chosen expert only (falling back down the ranking if it fails)."""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime to know that a pydantic model is the request body.
import asyncio
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from fastapi import Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app import objective
from serve_app.answers import Generation, has_mask
from serve_app.api import Guard, create_api
from serve_app.config import POOL_PREFIX, ExpertConfig, LibraryConfig
from serve_app.errors import BadRequest, NoExpertAvailable, Overloaded, UnknownExpert
from serve_app.learn.route import check_prompt
from serve_app.protocol import (
    MAX_SEED,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    Chunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    ExpertRequest,
    Failure,
    Health,
    InferRequest,
    InferResponse,
    ModelCard,
    ModelList,
    RankedOut,
    RouterCard,
    RouteRequest,
    RouteResponse,
    Usage,
)
from serve_app.telemetry import Telemetry

logger = logging.getLogger("ray.serve")
api = create_api()


def _ranking(
    ranking: list[objective.Ranked], penalties: dict, weights: dict[str, float]
) -> list[RankedOut]:
    """The ranking as answered, each entry with its weighted penalty terms by name."""
    return [
        RankedOut(
            **r.as_dict(),
            penalties=objective.weighted_penalties(r.expert, penalties, weights),
        )
        for r in ranking
    ]


def _head(payload: BaseModel) -> Response:
    """A HEAD answer: the headers GET's answer carries (its type and length), no body. GET's
    body is pydantic's own JSON of the model (FastAPI's path), measured the same way."""
    length = len(payload.model_dump_json().encode())
    return Response(headers={"content-length": str(length)}, media_type="application/json")


def _sampling(temperature: float | None, top_p: float | None, seed: int | None) -> dict:
    """A request's sampling settings: none is greedy; top_p 0 is greedy too (said as such,
    as a remote server may refuse top_p 0); no seed, a new one, so that sampled answers
    vary from request to request unless the client fixes the seed."""
    temperature = temperature or 0.0
    if top_p == 0:
        temperature, top_p = 0.0, 1.0
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    return {"temperature": temperature, "top_p": 1.0 if top_p is None else top_p, "seed": seed}


def _answered_by(response: Response, expert: str, skipped: list[str]) -> None:
    """Headers that say who answered and whether it was a fallback."""
    response.headers["x-tryage-expert"] = expert
    response.headers["x-tryage-fallback"] = "true" if skipped else "false"


async def _sse(
    expert: str, kind: str, first: str | Generation, pieces: Any, telemetry: Telemetry
) -> AsyncIterator[str]:
    """OpenAI's stream: one `data: {chunk}` event per piece of text, a last chunk with the
    finish reason and usage, then `data: [DONE]`. Leaving early (the client disconnected)
    cancels the expert's stream, which stops its generation."""
    ident = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def event(choice: ChunkChoice, usage: Usage | None = None) -> str:
        chunk = Chunk(
            id=ident, object=kind, created=created, model=expert, choices=[choice], usage=usage
        )
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    def piece(text: str) -> ChunkChoice:
        if kind == "text_completion":
            return ChunkChoice(text=text)
        return ChunkChoice(delta={"content": text})

    try:
        if kind != "text_completion":
            yield event(ChunkChoice(delta={"role": "assistant"}))
        item = first
        while True:
            if isinstance(item, Generation):
                telemetry.tokens(expert, item.prompt_tokens, item.completion_tokens)
                empty = {"text": ""} if kind == "text_completion" else {"delta": {}}
                yield event(ChunkChoice(finish_reason=item.finish_reason, **empty), _usage(item))
                break
            if isinstance(item, Failure):  # after the first token: end the stream, say why
                logger.error("expert %s failed while streaming: %s", expert, item.message)
                yield event(ChunkChoice(finish_reason="error"))
                break
            yield event(piece(item))
            try:
                item = await pieces.__anext__()
            except StopAsyncIteration:
                break
            except Exception as err:  # the replica died, a remote stream broke: say so, end
                logger.exception("expert %s's stream broke", expert)
                item = Failure(message=f"{type(err).__name__} while streaming")
        yield "data: [DONE]\n\n"
    finally:
        pieces.cancel()


def _card(e: ExpertConfig) -> ModelCard:
    """An expert as `/v1/models` lists it."""
    return ModelCard(
        id=e.name,
        task=e.task,
        params=e.params,
        released=e.released.isoformat(),
        description=e.description,
        trusted=e.trusted,
        price=e.price.model_dump() if e.price else None,
    )


def _usage(gen: Generation) -> Usage:
    """OpenAI's usage: tokens of the expert that answered."""
    total = gen.prompt_tokens + gen.completion_tokens
    return Usage(
        prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens, total_tokens=total
    )


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Routes and dispatches; holds one handle per expert: its deployment's, or its pool's
    with the expert as the multiplexed model id."""

    def __init__(
        self,
        library: LibraryConfig,
        router: DeploymentHandle,
        experts: dict[str, DeploymentHandle],
    ):
        self.library = library
        self.router = router
        pools = {e.name for e in library.experts if e.pool is not None}
        self.experts = {
            name: handle.options(multiplexed_model_id=name) if name in pools else handle
            for name, handle in experts.items()
        }
        self.penalties = objective.penalties(library.experts)
        self.limits = library.ingress
        self.policy = library.policy
        self.task_of = {e.name: e.task for e in library.experts}
        # The Serve deployment that answers each expert: its pool's, or its own.
        self.deployment_of = {
            e.name: POOL_PREFIX + e.pool if e.pool is not None else e.name for e in library.experts
        }
        # Checked before FastAPI reads a request (serve_app.api.GuardMiddleware). The keys come
        # from this replica's environment, which build_app fills from the runtime environment.
        self.telemetry = Telemetry()
        api.state.telemetry = self.telemetry  # the error handlers count rejections
        api.state.guard = Guard(
            max_body_bytes=self.limits.max_body_bytes,
            key_digests=Guard.digests_from(os.environ),
        )

    # routing ----------------------------------------------------------------------------------

    def _clean(self, prompt: str) -> tuple[str, dict[str, float]]:
        """Check the prompt's length and strip its flags (unless the policy turns them off):
        the same check `tryage route` makes."""
        return check_prompt(self.library, prompt)

    def _count(self, items: Any, what: str) -> None:
        """Refuse a list or mapping longer than ingress.max_list_items."""
        if items is not None and len(items) > self.limits.max_list_items:
            raise BadRequest(
                f"{what} has {len(items)} entries; the limit is {self.limits.max_list_items}", what
            )

    async def _rank(
        self,
        endpoint: str,
        text: str,
        flags: dict,
        weights: dict | None,
        allow: list | None,
        task: str | None,
        deadline: float | None = None,
    ) -> tuple[list[objective.Ranked], dict[str, float]]:
        """Eligible experts, predicted losses and the objective: the routing decision, and the
        weights it used. The router's answer is awaited until the request's `deadline`
        (time.time()), or request_timeout_s from now.

        Precedence: the operator's policy > the request's weights > prompt flags > library
        defaults."""
        self._count(weights, "weights")
        self._count(allow, "experts")
        start = time.perf_counter()
        names, merged = objective.plan(self.library, flags, weights, allow, task, has_mask(text))
        spent = time.perf_counter() - start
        # A router that hangs (a wedged device) must not hold requests for ever: it gets the
        # request's deadline, and then the answer is a 503 the client can retry.
        wait = self.limits.request_timeout_s if deadline is None else deadline - time.time()
        response = self.router.predict.remote(text)
        try:
            with self.telemetry.stage(endpoint, "router"):
                predicted = await asyncio.wait_for(response, max(0.0, wait))
        except TimeoutError:
            response.cancel()
            logger.error("the router gave no answer in %.3g s", wait)
            raise NoExpertAvailable("the router gave no answer in time; retry shortly") from None
        except BackPressureError as err:
            raise Overloaded(
                "the router is at its queue limit; retry shortly",
                status=err.status_code,
                retry_after_s=err.retry_after_s,
            ) from None
        except Exception as err:
            logger.exception("router failed", exc_info=err)
            raise NoExpertAvailable("the router is unavailable; retry shortly") from None
        if isinstance(predicted, Failure):  # this prompt alone failed in the router's batch
            raise NoExpertAvailable("the router could not read this prompt; retry shortly")
        start = time.perf_counter()
        ranking = objective.rank(predicted, self.penalties, merged, names)
        self.telemetry.observe(endpoint, "objective", spent + time.perf_counter() - start)
        return ranking, merged

    async def _dispatch(
        self,
        endpoint: str,
        ranking: list[objective.Ranked],
        call: Callable[[str], Any],
        deadline: float,
    ) -> tuple[str, Any, list[str]]:
        """Run `call` (an expert's name -> an awaitable that can be cancelled: a deployment
        response, or a task) on the best expert; on failure or timeout the next, up to max_attempts,
        all before the request's `deadline` (time.time(): request_timeout_s from its arrival,
        the router's wait included).

        An expert that refuses the request itself (its chat template rejects a system message,
        a remote server answers 400) is passed for the next too: another expert may take it.
        When every expert tried refused it, the answer is a 400 with the first refusal's reason.

        An expert whose deployment already refused this request for a full queue (a pool's
        other experts) is passed over without spending an attempt, since it would be refused
        too; it is not tried, so it is neither in `skipped` nor counted as a fallback (a pool
        of hundreds would otherwise list them all)."""
        end = time.monotonic() + (deadline - time.time())
        skipped: list[str] = []
        busy: BackPressureError | None = None
        full: set[str] = set()  # deployments at their queue limit, as found by this request
        attempts = 0
        refusals: list[Failure] = []  # the request itself refused, by the experts tried
        for ranked in ranking:
            left = end - time.monotonic()
            if attempts >= self.limits.max_attempts or left <= 0:
                break
            deployment = self.deployment_of.get(ranked.expert, ranked.expert)
            if deployment in full:  # not tried: not in `skipped`, nor counted as a fallback
                continue
            attempts += 1
            response = call(ranked.expert)
            try:
                with self.telemetry.stage(endpoint, "expert"):
                    wait = min(left, self.limits.expert_timeout_s)
                    answer = await asyncio.wait_for(response, wait)
            except BackPressureError as err:
                # The expert's queue is full (its max_queued_requests): the next one answers.
                logger.info("expert %s is at its queue limit; trying the next", ranked.expert)
                busy, reason = err, "busy"
                full.add(deployment)
            except TimeoutError:
                response.cancel()
                logger.error("expert %s gave no answer in time; trying the next", ranked.expert)
                reason = "timeout"
            except Exception as err:
                logger.exception("expert %s failed; trying the next", ranked.expert, exc_info=err)
                reason = "error"
            else:
                if not isinstance(answer, Failure):
                    self.telemetry.answered(endpoint, ranked.expert, ranked.predicted_loss)
                    return ranked.expert, answer, skipped
                if answer.client:
                    logger.info("expert %s refused the request: %s", ranked.expert, answer.message)
                    refusals.append(answer)
                    reason = "refused"
                else:
                    logger.error("expert %s failed on it: %s", ranked.expert, answer.message)
                    reason = "failed"
            self.telemetry.fallback(ranked.expert, reason)
            skipped.append(ranked.expert)
        if refusals and len(refusals) == attempts:
            where = "messages" if endpoint == "/v1/chat/completions" else "prompt"
            raise BadRequest(refusals[0].message, where)
        if busy is not None:
            raise Overloaded(
                f"the experts that could answer are busy ({', '.join(skipped)}); retry shortly",
                status=busy.status_code,
                retry_after_s=busy.retry_after_s,
            )
        if time.monotonic() >= end:
            raise NoExpertAvailable(
                f"no answer within the deadline of {self.limits.request_timeout_s:g} s "
                f"(tried: {', '.join(skipped) or 'none'}); retry shortly"
            )
        raise NoExpertAvailable(
            f"every expert tried failed or refused the request ({', '.join(skipped)}); "
            "retry shortly"
        )

    def _deadline(self) -> float:
        """Wall-clock time at which this request ends (taken as it arrives): routing, every
        attempt and the generation itself within ingress.request_timeout_s."""
        return time.time() + self.limits.request_timeout_s

    def _new_tokens(self, asked: int | None, field: str = "max_new_tokens") -> int:
        """Tokens to generate: `asked` (the request's `field`), or the default; over the limit
        is a 400 naming the field the client sent."""
        n = asked or self.limits.default_new_tokens
        if n > self.limits.max_new_tokens:
            raise BadRequest(f"{field} {n} is over the limit {self.limits.max_new_tokens}", field)
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
        """ok when the router answers; 503 while it cannot (starting, or being replaced)."""
        try:
            ready = await asyncio.wait_for(self.router.ready.remote(), 5.0)
        except Exception:
            ready = False
        if not ready:
            raise NoExpertAvailable("the router is not ready; retry shortly")
        return Health()

    # Load balancers probe with HEAD; kept out of the OpenAPI schema, where a second method of
    # one path would repeat its operation id.
    @api.head("/healthz", include_in_schema=False)
    async def healthz_head(self) -> Response:
        return _head(await self.healthz())

    @api.head("/v1/models", include_in_schema=False)
    async def models_head(self) -> Response:
        return _head(await self.models())

    @api.head("/v1/models/{model}", include_in_schema=False)
    async def model_head(self, model: str) -> Response:
        return _head(await self.model(model))  # 404 for a name that is neither tryage nor one

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        """The experts' cards, and (`ingress.list_tryage`) tryage's first."""
        cards = [_card(e) for e in self.library.experts]
        return ModelList(data=[self._router_card(), *cards] if self.limits.list_tryage else cards)

    @api.get("/v1/models/{model}", responses={404: {"model": ErrorResponse}})
    async def model(self, model: str) -> ModelCard | RouterCard:
        """One expert's card (OpenAI's retrieve), or what `tryage` routes among: the
        text-generation experts the operator's policy allows."""
        if model == "tryage":
            return self._router_card()
        self._known_model(model)
        return _card(self.library.expert(model))

    def _router_card(self) -> RouterCard:
        trusted_only = self.policy.trusted_only
        return RouterCard(
            description="Routes each request to the expert with the best score: the "
            "router's predicted loss plus the objective's weighted penalties.",
            experts=[
                e.name
                for e in self.library.experts
                if e.task == "text-generation" and (e.trusted or not trusted_only)
            ],
        )

    def _known_model(self, model: str) -> None:
        """404 for a model name that is neither `tryage` nor an expert."""
        if model != "tryage" and model not in self.experts:
            known = ", ".join(["tryage", *self.experts])
            raise UnknownExpert(f"unknown model {model!r}; known: {known}", "model")

    @api.post("/v1/route")
    async def route(self, body: RouteRequest) -> RouteResponse:
        text, flags = self._clean(body.prompt)
        endpoint = "/v1/route"
        ranking, used = await self._rank(
            endpoint, text, flags, body.weights, body.experts, body.task
        )
        self.telemetry.answered(endpoint, ranking[0].expert, ranking[0].predicted_loss)
        return RouteResponse(
            expert=ranking[0].expert, ranking=_ranking(ranking, self.penalties, used)
        )

    @api.post("/v1/infer")
    async def infer(self, body: InferRequest, response: Response) -> InferResponse:
        deadline = self._deadline()
        text, flags = self._clean(body.prompt)
        endpoint = "/v1/infer"
        ranking, used = await self._rank(
            endpoint, text, flags, body.weights, body.experts, body.task, deadline
        )
        asked = self._new_tokens(body.max_new_tokens)
        payload = ExpertRequest(
            prompt=text,
            max_new_tokens=asked,
            **_sampling(body.temperature, body.top_p, body.seed),
            top_k=body.top_k,
            stop=tuple(body.stop or ()),
            deadline=deadline,
        )
        call = self._on_expert(payload)
        expert, output, skipped = await self._dispatch(endpoint, ranking, call, deadline)
        task = self.task_of[expert]
        _answered_by(response, expert, skipped)
        generated = isinstance(output, Generation)
        if generated:
            self.telemetry.tokens(expert, output.prompt_tokens, output.completion_tokens)
        return InferResponse(
            expert=expert,
            task=task,
            output=output.text if generated else asdict(output),
            ranking=_ranking(ranking, self.penalties, used),
            skipped=skipped,
            fallback=bool(skipped),
            max_new_tokens=output.max_new_tokens if generated else None,
            clamped=generated and output.max_new_tokens < asked,
        )

    async def _openai_ranking(
        self, endpoint: str, body: Any, raw: str, deadline: float, where: str = "prompt"
    ) -> tuple[str, list[objective.Ranked]]:
        """Route (or pin) an OpenAI request among text-generation experts: the text routed on
        (`raw`, the prompt or the last user message, its flags stripped; `where` names its
        field) and the ranking."""
        try:
            text, flags = self._clean(raw)
        except BadRequest as err:
            if where == "prompt" or err.param != "prompt":
                raise
            raise BadRequest(f"{where}, the last user message: {err.message}", where) from None
        opts = body.tryage
        allow = opts.experts if opts else None
        self._known_model(body.model)
        if body.model != "tryage":
            if allow is not None:
                self._count(allow, "experts")
                objective.eligible(self.library.experts, allow)  # unknown names: a 404
                if body.model not in allow:
                    raise BadRequest(
                        f"model {body.model!r} is pinned but not in tryage.experts; pin one of "
                        "them, or send model 'tryage' to route among them",
                        "tryage.experts",
                    )
            allow = [body.model]
            if self.task_of[body.model] != "text-generation":
                raise BadRequest(
                    f"model {body.model!r} is a {self.task_of[body.model]} expert; these "
                    "endpoints answer with text-generation experts (/v1/infer takes any)",
                    "model",
                )
        weights = opts.weights if opts else None
        ranking, _ = await self._rank(
            endpoint, text, flags, weights, allow, "text-generation", deadline
        )
        return text, ranking

    async def _stream(
        self,
        endpoint: str,
        ranking: list[objective.Ranked],
        payload: ExpertRequest,
        kind: str,
        deadline: float,
    ) -> StreamingResponse:
        """Stream the best expert's answer as Server-Sent Events. Fallback (the same as for a
        whole answer, `_dispatch`) happens only before the first token: an expert is chosen
        once its stream has yielded something."""

        async def start(name: str) -> tuple[Any, Any] | Failure:
            pieces = self.experts[name].options(stream=True).generate_stream.remote(payload)
            try:
                first = await pieces.__anext__()
            except BaseException:  # failed, or timed out and cancelled: stop the stream
                pieces.cancel()
                raise
            if isinstance(first, Failure):
                pieces.cancel()
                return first
            return first, pieces

        call = lambda name: asyncio.ensure_future(start(name))  # noqa: E731
        expert, (first, pieces), skipped = await self._dispatch(endpoint, ranking, call, deadline)
        headers = {
            "x-tryage-expert": expert,
            "x-tryage-fallback": "true" if skipped else "false",
            "cache-control": "no-cache",
        }
        events = _sse(expert, kind, first, pieces, self.telemetry)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    def _settings(self, body: Any, max_tokens: int | None, field: str = "max_tokens") -> dict:
        """Generation settings of an OpenAI request (`max_tokens` sent as `field`)."""
        asked = max_tokens or self.limits.openai_default_max_tokens
        return {
            "max_new_tokens": self._new_tokens(asked, field),
            **_sampling(body.temperature, body.top_p, body.seed),
            "stop": tuple(body.stop or ()),
            "deadline": self._deadline(),
        }

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, response: Response) -> Completion:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise BadRequest("send exactly one prompt per request", "prompt")
        settings = self._settings(body, body.max_tokens)
        endpoint = "/v1/completions"
        deadline = settings["deadline"]
        text, ranking = await self._openai_ranking(endpoint, body, prompts[0], deadline)
        payload = ExpertRequest(prompt=text, **settings)
        if body.stream:
            return await self._stream(endpoint, ranking, payload, "text_completion", deadline)
        call = self._on_expert(payload)
        expert, gen, skipped = await self._dispatch(endpoint, ranking, call, deadline)
        self.telemetry.tokens(expert, gen.prompt_tokens, gen.completion_tokens)
        _answered_by(response, expert, skipped)
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=expert,
            choices=[CompletionChoice(text=gen.text, finish_reason=gen.finish_reason)],
            usage=_usage(gen),
        )

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, response: Response) -> ChatCompletion:
        if len(body.messages) > self.limits.max_messages:
            raise BadRequest(
                f"{len(body.messages)} messages; the limit is {self.limits.max_messages}",
                "messages",
            )
        users = [i for i, m in enumerate(body.messages) if m.role == "user"]
        if not users:
            raise BadRequest("messages need at least one user message", "messages")
        size = sum(len(m.content) for m in body.messages)
        if size > self.limits.max_prompt_chars:
            raise BadRequest(
                f"messages have {size} characters; the limit is {self.limits.max_prompt_chars}",
                "messages",
            )
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        settings = self._settings(body, body.max_completion_tokens or body.max_tokens, field)

        def build(text: str) -> ExpertRequest:
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            messages[users[-1]]["content"] = text  # the routed message, flags stripped
            return ExpertRequest(messages=messages, **settings)

        endpoint = "/v1/chat/completions"
        last = f"messages.{users[-1]}.content"
        deadline = settings["deadline"]
        text, ranking = await self._openai_ranking(
            endpoint, body, body.messages[users[-1]].content, deadline, last
        )
        if body.stream:
            chunk = "chat.completion.chunk"
            return await self._stream(endpoint, ranking, build(text), chunk, deadline)
        call = self._on_expert(build(text))
        expert, gen, skipped = await self._dispatch(endpoint, ranking, call, deadline)
        self.telemetry.tokens(expert, gen.prompt_tokens, gen.completion_tokens)
        _answered_by(response, expert, skipped)
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
