"""HTTP request and response models of the ingress: tryage's own API and OpenAI's shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="Sampling seed when temperature > 0.")
    top_k: int = Field(5, ge=1, le=50, description="Predictions per mask (fill-mask).")


class RankedOut(BaseModel):
    expert: str
    predicted_loss: float
    penalty: float
    score: float


class RouteResponse(BaseModel):
    expert: str
    ranking: list[RankedOut]


class InferResponse(RouteResponse):
    task: str
    output: Any = Field(description="Generated text, or the fill-mask predictions.")
    skipped: list[str] = Field(
        default_factory=list, description="Experts ranked higher that failed and were passed over."
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "tryage"
    task: str
    params: int | None
    released: str
    description: str
    trusted: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- OpenAI shapes ---------------------------------------------------------------------------


class RoutingOptions(_Request):
    """The extra `tryage` object of an OpenAI request."""

    weights: dict[str, float] | None = None
    experts: list[str] | None = None


class _OpenAIRequest(BaseModel):
    # OpenAI clients send fields tryage does not use (user, logprobs, ...): accept, ignore.
    model_config = ConfigDict(extra="ignore")

    model: str = Field("tryage", description="'tryage' routes; an expert's name pins it.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")
    stream: bool = Field(False, description="Streaming is not supported.")
    seed: int | None = None
    tryage: RoutingOptions | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
