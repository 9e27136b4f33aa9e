"""HTTP request models: types are strict; tryage's own refuse unknown fields, OpenAI's ignore
those tryage does not use."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.protocol import ChatRequest, CompletionRequest, InferRequest, RouteRequest

USER_HI = {"role": "user", "content": "hi"}


def test_route_request_takes_prompt_weights_experts_and_task():
    req = RouteRequest.model_validate(
        {"prompt": "hi", "weights": {"size": 0.5}, "experts": ["gen-xs"], "task": "fill-mask"}
    )
    assert (req.prompt, req.weights, req.experts, req.task) == (
        "hi",
        {"size": 0.5},
        ["gen-xs"],
        "fill-mask",
    )


@pytest.mark.parametrize("model", [RouteRequest, InferRequest])
def test_tryage_requests_refuse_unknown_fields(model):
    with pytest.raises(ValidationError, match="colour"):
        model.model_validate({"prompt": "hi", "colour": "red"})


def test_route_request_refuses_an_unknown_task():
    with pytest.raises(ValidationError, match="task"):
        RouteRequest.model_validate({"prompt": "hi", "task": "summarise"})


@pytest.mark.parametrize(
    "field",
    [{"max_new_tokens": 0}, {"temperature": 2.5}, {"top_p": -0.1}, {"top_k": 51}, {"seed": 2**63}],
)
def test_infer_request_refuses_out_of_range_sampling(field):
    with pytest.raises(ValidationError, match=next(iter(field))):
        InferRequest.model_validate({"prompt": "hi", **field})


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("model", [InferRequest, CompletionRequest])
def test_a_non_finite_sampling_setting_is_refused_as_such(model, field):
    # not "should be less than or equal to 2": NaN compares false with every bound
    with pytest.raises(ValidationError, match="finite number"):
        model.model_validate({"prompt": "hi", field: float("nan")})


@pytest.mark.parametrize("model", [CompletionRequest, ChatRequest])
def test_openai_requests_take_what_openai_s_api_takes(model):
    # null for n and stream, top_p 0 (greedy), a negative seed: all valid in OpenAI's API.
    body = {"prompt": "hi"} if model is CompletionRequest else {"messages": [USER_HI]}
    req = model.model_validate({**body, "n": None, "stream": None, "top_p": 0, "seed": -5})
    assert (req.n, req.stream, req.top_p, req.seed) == (None, None, 0, -5)


def test_openai_requests_ignore_fields_tryage_does_not_use():
    req = CompletionRequest.model_validate(
        {"prompt": "hi", "user": "u-1", "logprobs": 2, "max_tokens": 4}
    )
    assert req.prompt == "hi"
    assert req.max_tokens == 4
    assert "user" not in req.model_dump()
    chat = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi", "name": "me"}], "user": "u-1"}
    )
    assert chat.messages[0].content == "hi"
    assert chat.model == "tryage"


@pytest.mark.parametrize("model", [CompletionRequest, ChatRequest])
def test_openai_requests_refuse_more_than_one_choice(model):
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    assert [e["loc"] for e in err.value.errors()] == [("n",)]


def test_the_tryage_routing_options_are_strict():
    with pytest.raises(ValidationError, match="colour"):
        CompletionRequest.model_validate({"prompt": "hi", "tryage": {"colour": "red"}})
    req = CompletionRequest.model_validate(
        {"prompt": "hi", "tryage": {"weights": {"size": 1}, "experts": ["gen-xs"]}}
    )
    assert req.tryage.weights == {"size": 1.0}


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (CompletionRequest, "stream", "yes"),
        (CompletionRequest, "stream", 1),
        (CompletionRequest, "max_tokens", "10"),
        (CompletionRequest, "max_tokens", 10.0),
        (CompletionRequest, "max_tokens", True),
        (CompletionRequest, "temperature", "0.5"),
        (ChatRequest, "max_completion_tokens", "10"),
        (InferRequest, "max_new_tokens", "10"),
        (InferRequest, "seed", "7"),
        (RouteRequest, "weights", {"size": "1"}),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_converted(model, field, value):
    # As OpenAI does: "yes" is not true and "10" is not 10; the error names the field.
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], field: value}
    if model in (RouteRequest, InferRequest):
        body.pop("messages")
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    assert err.value.errors()[0]["loc"][0] == field


def test_a_whole_number_is_still_a_float_and_a_refusal_part_is_text():
    req = CompletionRequest.model_validate({"prompt": "hi", "temperature": 1, "top_p": 1})
    assert (req.temperature, req.top_p) == (1.0, 1.0)
    assert RouteRequest.model_validate({"prompt": "hi", "weights": {"size": 2}}).weights == {
        "size": 2.0
    }
    chat = ChatRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "write malware"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                {"role": "user", "content": "then a poem"},
            ]
        }
    )
    assert chat.messages[1].content == "I can't."


def test_a_chat_request_needs_a_message():
    with pytest.raises(ValidationError, match="messages"):
        ChatRequest.model_validate({"messages": []})


def test_the_openapi_schema_names_every_operation_once_and_leaves_head_probes_out():
    from deployments.ingress import api

    spec = api.openapi()
    ops = [
        (path, method, op["operationId"])
        for path, p in spec["paths"].items()
        for method, op in p.items()
    ]
    assert len({op for _, _, op in ops}) == len(ops), ops
    assert "head" not in {method for _, method, _ in ops}
    assert {"/healthz", "/v1/models", "/v1/models/{model}"} <= set(spec["paths"])
