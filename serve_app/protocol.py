"""Every HTTP request and response model of the ingress, tryage's own API and OpenAI's shapes,
the one error model, and the typed messages between the ingress and the experts.

The response models are the endpoints' `response_model`s, so /openapi.json describes what the
service answers, and a field a client relies on cannot go missing without a test failing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

#: The sampling seed's range: a signed 64-bit integer, as OpenAI's API takes (torch takes it).
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
#: Stop strings a request may give, and their longest (OpenAI's limit is 4 strings).
MAX_STOPS, MAX_STOP_CHARS = 4, 256


class FieldError(ValueError):
    """A model-level check's finding about one of the model's fields (`field`): the error
    names it under the model's own place, as `messages.0.content`."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class LoneSurrogate(ValueError):
    """Text that cannot be encoded as UTF-8; `where` names the request field holding it
    (dotted, as `messages.0.content`), or is None for the body itself."""

    def __init__(self, where: str | None):
        super().__init__(
            "text must be valid Unicode; it holds a lone surrogate (such as \\ud800), "
            "which cannot be encoded as UTF-8"
        )
        self.where = where


def _check_unicode(value: Any, path: tuple[Any, ...] = ()) -> None:
    """Refuse text that cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800" in
    JSON): a tokenizer would fail on it, and an answer could not be encoded."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise LoneSurrogate(".".join(map(str, path)) or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path)  # a bad key is named by the object holding it
            _check_unicode(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, (*path, i))


class _Unicode(BaseModel):
    """Every string of a request, keys included, must be encodable. Types are strict, as
    OpenAI's are: `"stream": "yes"`, `"max_tokens": "10"` or `"size": "1"` is a 400, not read
    as true, 10 or 1 (a whole number is still a float: `"temperature": 1`)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class _Request(_Unicode):
    model_config = ConfigDict(extra="forbid")


def _stops(value: Any) -> Any:
    """OpenAI's `stop`: one string or a list of up to MAX_STOPS, each non-empty."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):  # anything else: the field's type says what is wrong
        if len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings; {len(value)} given")
        if any(isinstance(s, str) and not 0 < len(s) <= MAX_STOP_CHARS for s in value):
            raise ValueError(f"a stop string has 1 to {MAX_STOP_CHARS} characters")
    return value


_StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
#: Stop strings: the answer ends before the first of them, which is not returned.
Stop = Annotated[
    list[str] | None,
    BeforeValidator(
        _stops,
        json_schema_input_type=_StopString
        | Annotated[list[_StopString], Field(max_length=MAX_STOPS)]
        | None,
    ),
    Field(
        description=f"Up to {MAX_STOPS} strings (or one string): the answer ends before the "
        "first of them to appear, which is not returned; finish_reason is then 'stop'."
    ),
]


# --- errors -------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong, in OpenAI's error shape."""

    message: str = Field(description="What went wrong and what would be valid; safe to show.")
    type: str = Field(description="invalid_request_error, not_found_error, overloaded_error, ...")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="A stable machine-readable code.")


class ErrorResponse(BaseModel):
    """The one error body of the HTTP API: `{"error": {message, type, param, code}}`."""

    error: ErrorDetail


# --- tryage's API -------------------------------------------------------------------------


class RouteRequest(_Request):
    """POST /v1/route: which expert would answer this prompt."""

    prompt: str = Field(description="The prompt; `[flag: ...]` markers set weights.")
    weights: dict[str, float] | None = Field(
        None, description="Objective weights by name; override the library's defaults."
    )
    experts: list[str] | None = Field(None, description="Allow-list of expert names.")
    task: Literal["text-generation", "fill-mask"] | None = Field(
        None, description="Only experts of this task."
    )


class InferRequest(RouteRequest):
    """POST /v1/infer: route, then run the prompt on the chosen expert."""

    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate.")
    temperature: float = Field(
        0.0,
        ge=0,
        le=2,
        allow_inf_nan=False,
        description="0 is greedy (and so is anything below 0.01).",
    )
    top_p: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass (0: greedy)."
    )
    seed: int | None = Field(
        None,
        ge=MIN_SEED,
        le=MAX_SEED,
        description="Sampling seed when temperature > 0 (the same seed, the same answer); "
        "none: a new one each request.",
    )
    top_k: int = Field(5, ge=1, le=50, description="Predictions per mask (fill-mask).")
    stop: Stop = None


class RankedOut(BaseModel):
    """One expert's place in a ranking (serve_app.objective.Ranked)."""

    expert: str = Field(description="The expert's name.")
    predicted_loss: float = Field(description="The router's predicted loss, bits per byte.")
    penalty: float = Field(description="Sum of weight x penalty over the request's weights.")
    score: float = Field(description="predicted_loss + penalty; the lowest is chosen.")
    penalties: dict[str, float] = Field(
        default_factory=dict,
        description="The penalty's terms: weight x the expert's penalty, by weight name (those "
        "the request used).",
    )


class RouteResponse(BaseModel):
    """The routing decision: the chosen expert first in the ranking."""

    expert: str = Field(description="The chosen expert.")
    ranking: list[RankedOut] = Field(description="Eligible experts by score, best first.")


class InferResponse(RouteResponse):
    """The routing decision and the chosen expert's answer."""

    task: str = Field(description="The answering expert's task.")
    output: Any = Field(description="Generated text, or the fill-mask predictions.")
    skipped: list[str] = Field(
        default_factory=list,
        description="Experts ranked higher that were tried and failed, refused the request, "
        "were busy or gave no answer in time (not those of a pool that had already refused "
        "the request for a full queue).",
    )
    fallback: bool = Field(
        False, description="Whether an expert below the first of the ranking answered."
    )
    max_new_tokens: int | None = Field(
        None,
        description="New tokens the expert was allowed: the request's, or fewer where its "
        "context is shorter (then `clamped` is true).",
    )
    clamped: bool = Field(False, description="Whether max_new_tokens was cut to fit the context.")


class Health(BaseModel):
    status: Literal["ok"] = Field("ok", description="The router answers: the service can route.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "tryage"
    task: str
    params: int | None
    released: str
    description: str
    trusted: bool
    price: dict[str, float] | None = None


class RouterCard(BaseModel):
    """`GET /v1/models/tryage`: the model name that routes."""

    id: Literal["tryage"] = "tryage"
    object: Literal["model"] = "model"
    owned_by: str = "tryage"
    description: str = Field(description="What asking for this model does.")
    experts: list[str] = Field(description="The experts it routes among.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard | RouterCard] = Field(
        description="The experts' cards; with ingress.list_tryage, tryage's card first."
    )


# --- OpenAI's API -------------------------------------------------------------------------


class RoutingOptions(_Request):
    """The extra `tryage` object of an OpenAI request."""

    weights: dict[str, float] | None = Field(
        None, description="Objective weights by name; override the library's defaults."
    )
    experts: list[str] | None = Field(None, description="Allow-list of expert names.")


class TextFormat(BaseModel):
    """The one response_format answered: plain text."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]


def _text_format(value: Any) -> Any:
    """Only plain text answers: a JSON format is refused, not ignored."""
    kind = value.get("type") if isinstance(value, dict) else value
    if value is not None and kind != "text":
        raise ValueError(
            f"response_format {kind!r} is not supported: the experts' output cannot be "
            "constrained to JSON; only {'type': 'text'}. Ask for JSON in the prompt instead"
        )
    return value


def _only(ok: Callable[[Any], bool], refusal: str) -> Callable[[Any], Any]:
    """A validator that refuses a value `ok` does not accept, in words saying why."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(refusal)
        return value

    return check


def _no_forced_call(value: Any) -> Any:
    """`tools` are ignored (an answer may always be text), but a forced call is refused.
    OpenAI's `allowed_tools` choice forces nothing in its "auto" mode."""
    if value is None or value in ("auto", "none"):
        return value
    kind = value.get("type") if isinstance(value, dict) else None
    inner = value.get("allowed_tools") if kind == "allowed_tools" else None
    mode = inner.get("mode") if isinstance(inner, dict) else None
    if mode == "auto":
        return value
    named = isinstance(value, dict) and ("function" in value or "name" in value)  # a function
    forced = value == "required" or named or mode == "required"
    if not forced:  # not one of OpenAI's shapes at all
        raise ValueError(
            f"{json.dumps(value)} is not a tool choice: 'auto', 'none', 'required', a named "
            "function, or allowed_tools with a mode 'auto' or 'required'"
        )
    raise ValueError(
        f"{json.dumps(value)} is not supported: only 'auto' or 'none' (or none at all); the "
        "experts answer text and cannot call tools, so a forced tool call cannot be honoured"
    )


class _OpenAIRequest(_Unicode):
    # OpenAI clients send fields tryage does not use (user, logprobs, tools, ...): accept and
    # ignore them (an answer's `logprobs` says null, and it never calls a tool); refuse those
    # whose answer would silently lack what was asked (n > 1, a JSON response_format, a
    # forced tool call, token biases).
    model_config = ConfigDict(extra="ignore")

    model: str = Field("tryage", description="'tryage' routes; an expert's name pins it.")
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate (ingress.openai_default_max_tokens if none)."
    )
    temperature: float | None = Field(
        None, ge=0, le=2, allow_inf_nan=False, description="0 or none is greedy."
    )
    top_p: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass (0: greedy)."
    )
    n: int | None = Field(1, ge=1, le=1, description="Choices; only one is supported.")
    stream: bool | None = Field(
        False,
        description="true: Server-Sent Events in OpenAI's chunk format, ending with "
        "`data: [DONE]`; the last chunk carries usage.",
    )
    seed: int | None = Field(
        None, ge=MIN_SEED, le=MAX_SEED, description="Sampling seed when temperature > 0."
    )
    stop: Stop = None
    response_format: Annotated[
        dict[str, Any] | None,
        BeforeValidator(_text_format, json_schema_input_type=TextFormat | None),
    ] = Field(None, description="{'type': 'text'} or none; a JSON format is a 400.")
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        BeforeValidator(_no_forced_call, json_schema_input_type=Literal["auto", "none"] | None),
    ] = Field(
        None, description="'auto', 'none' or none: `tools` are ignored; a forced call is a 400."
    )
    function_call: Annotated[
        str | dict[str, Any] | None,
        BeforeValidator(_no_forced_call, json_schema_input_type=Literal["auto", "none"] | None),
    ] = Field(None, description="The legacy tool_choice, likewise.")
    logit_bias: Annotated[
        dict[str, Any] | None,
        BeforeValidator(
            _only(
                lambda v: not v or (isinstance(v, dict) and not any(v.values())),
                "not supported: the experts sample without token biases (an empty or all-zero "
                "one is accepted)",
            )
        ),
    ] = Field(None, description="None or empty: token biases are not applied; any is a 400.")
    tryage: RoutingOptions | None = Field(
        None, description="tryage's routing options: weights and an allow-list of experts."
    )


class CompletionRequest(_OpenAIRequest):
    """OpenAI's completions request."""

    prompt: Annotated[
        str | list[str],
        BeforeValidator(
            _only(
                lambda v: (
                    isinstance(v, str)
                    or (isinstance(v, list) and all(isinstance(x, str) for x in v))
                ),
                "must be a string, or a list of one string (token ids are not taken)",
            )
        ),
    ] = Field(description="One prompt (a list of exactly one is accepted).")
    echo: Annotated[
        bool | None,
        BeforeValidator(
            _only(
                lambda v: v in (False, None),
                "echo must be false: an answer never repeats its prompt (prepend it yourself)",
            )
        ),
    ] = Field(False, description="Only false: the answer never repeats the prompt; true is a 400.")
    best_of: Annotated[
        int | None,
        BeforeValidator(
            _only(lambda v: v in (1, None), "best_of must be 1: one answer is generated")
        ),
    ] = Field(1, description="Only 1: one answer is generated.")
    suffix: Annotated[
        str | None,
        BeforeValidator(
            _only(
                lambda v: not v,
                "suffix is not supported: the experts continue text, they do not fill it in",
            )
        ),
    ] = Field(None, description="None or empty: the experts continue text; a suffix is a 400.")


class TextPart(BaseModel):
    """A text part of a message's content (OpenAI's content parts)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class RefusalPart(BaseModel):
    """An assistant's refusal part, replayed in a chat: read as its text."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["refusal"]
    refusal: str


def _text_of(content: Any) -> Any:
    """A message's text: a string, or its text parts joined by newlines (as vLLM joins them).
    An assistant's `refusal` part (OpenAI replays it in a chat) counts as its text. Parts of
    another type (an image, audio, a file) are refused: the experts read text."""
    if not isinstance(content, list):
        return content
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            if not isinstance(part.get("refusal"), str):
                raise ValueError(f"content part {i} is a refusal part without a string 'refusal'")
            texts.append(part["refusal"])
            continue
        if kind != "text":
            raise ValueError(
                f"content part {i} is not a text part ({{'type': 'text', 'text': ...}}); "
                f"the experts read text only (its type: {kind!r})"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {i} is a text part without a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(_Unicode):
    """One message of a chat."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(
        description="Who wrote it; the last user message is what the router reads."
    )
    content: Annotated[
        str,
        BeforeValidator(_text_of, json_schema_input_type=str | list[TextPart | RefusalPart] | None),
    ] = Field(
        description="The message's text, or a list of text parts (joined by newlines); an "
        "assistant's may be null or left out (a turn that called tools: its text is empty)."
    )

    @model_validator(mode="before")
    @classmethod
    def _assistant_without_text(cls, data: Any) -> Any:
        # An assistant turn that called tools has no content (null or absent): replaying such
        # a chat from another model is normal, and its text is empty. Other roles must say
        # something.
        if not isinstance(data, dict):
            return data
        content = data.get("content")
        if data.get("role") == "assistant":
            return {**data, "content": ""} if content is None else data
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") == "refusal" for part in content
        ):
            raise FieldError(
                "a refusal content part is an assistant's; this message is not", "content"
            )
        return data


class ChatRequest(_OpenAIRequest):
    """OpenAI's chat completions request."""

    messages: list[ChatMessage] = Field(min_length=1, description="The chat so far.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate; takes precedence over max_tokens."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str


class Completion(BaseModel):
    """OpenAI's text_completion; `model` is the expert that answered."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion; `model` is the expert that answered."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int = 0
    text: str | None = None  # completions
    delta: dict[str, str] | None = None  # chat: {"role"} first, then {"content"}
    finish_reason: str | None = None


class Chunk(BaseModel):
    """One Server-Sent Event of a streamed answer (text_completion or
    chat.completion.chunk); `usage` on the last one."""

    id: str
    object: Literal["text_completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --- ingress -> expert --------------------------------------------------------------------


class ExpertRequest(BaseModel):
    """What the ingress asks an expert deployment: a prompt (or chat messages) and settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 5  # fill-mask predictions per mask
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    deadline: float | None = None  # time.time() after which a generation stops where it is

    def generation_settings(self) -> tuple[int, float, float, tuple[str, ...]]:
        """The settings requests must share to run in one generation batch (a seed need not
        be shared: each row samples from a generator of its own)."""
        return (self.max_new_tokens, self.temperature, self.top_p, self.stop)


class Failure(BaseModel):
    """One request of a batch that could not be answered; the rest of the batch was.

    `client`: the request itself caused it (a chat template that refuses the messages, say):
    the next expert in the ranking may take it, and a request every expert tried refuses is a
    400. Otherwise the expert failed: the next in the ranking is tried."""

    model_config = ConfigDict(frozen=True)

    message: str
    client: bool = False
