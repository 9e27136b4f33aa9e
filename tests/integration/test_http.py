"""The HTTP API of a served smoke library, over real HTTP on a local Ray."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from ray import serve

from serve_app.config import load_library
from tests.integration.conftest import client, warm

TEXT_GEN = {"gen-xs", "gen-s", "gen-m"}


@pytest.fixture(scope="module")
def api(serve_port, smoke_app, smoke_library) -> httpx.Client:
    # The session's smoke app ("main", its router held at one replica), every expert started.
    warm({"main": load_library(smoke_library).names})
    with client(serve_port) as c:
        yield c


@pytest.fixture(scope="module")
def oai(api, serve_port) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="unused", timeout=120, max_retries=0
    )


def route(api, **body) -> dict:
    r = api.post("/v1/route", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


# --- the contract's endpoints ---------------------------------------------------------------


def test_healthz(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    # load balancers probe with HEAD
    assert api.head("/healthz").status_code == 200
    assert api.head("/v1/models").status_code == 200
    assert [api.head(f"/v1/models/{m}").status_code for m in ("gen-m", "tryage", "nope")] == [
        200,
        200,
        404,
    ]
    for path in ("/healthz", "/v1/models", "/v1/models/gen-m", "/v1/models/tryage"):
        head, get = api.head(path), api.get(path)
        assert head.content == b""
        for name in ("content-type", "content-length"):  # the headers GET's answer has
            assert head.headers[name] == get.headers[name], (path, name)


def test_models_lists_every_expert_with_its_card(api, smoke_library):
    body = api.get("/v1/models").json()
    library = load_library(smoke_library)
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == library.names
    gen_m = next(m for m in body["data"] if m["id"] == "gen-m")
    assert gen_m["object"] == "model"
    assert gen_m["task"] == "text-generation"
    assert gen_m["params"] == library.expert("gen-m").params > 0
    assert gen_m["released"] == "2025-01-15"
    assert gen_m["trusted"] is True
    assert gen_m["description"]


def test_a_model_s_card_is_retrieved_by_name_as_openai_s_client_does(api, oai, smoke_library):
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    for name in load_library(smoke_library).names:
        assert api.get(f"/v1/models/{name}").json() == listed[name]
    card = oai.models.retrieve("gen-m")
    assert card.id == "gen-m" and card.object == "model" and card.owned_by == "tryage"
    router = api.get("/v1/models/tryage").json()
    # what model "tryage" routes among: the text-generation experts (not the masked LM)
    routed = [name for name, card in listed.items() if card["task"] == "text-generation"]
    assert router["id"] == "tryage" and router["experts"] == routed and "mask-s" not in routed
    assert router["description"]
    err = assert_error(api.get("/v1/models/nope"), 404, "model")
    assert err["code"] == "model_not_found" and "tryage" in err["message"]
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_route_ranks_eligible_experts_by_score(api):
    body = route(api, prompt="def add(a, b):\n    return a + b")
    ranking = body["ranking"]
    # No [MASK] in the prompt: the masked LM is not eligible.
    assert {r["expert"] for r in ranking} == TEXT_GEN
    assert body["expert"] == ranking[0]["expert"]
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores)
    for r in ranking:
        assert math.isclose(r["score"], r["predicted_loss"] + r["penalty"], rel_tol=1e-9)
        assert r["penalty"] == 0.0  # the smoke library's default weights are zero


def test_same_prompt_same_route(api):
    first = route(api, prompt="The patient presented with chest pain.")
    again = route(api, prompt="The patient presented with chest pain.")
    assert first == again


def test_large_size_weight_picks_the_smallest(api):
    assert route(api, prompt="hello there", weights={"size": 50})["expert"] == "gen-xs"


def test_large_recency_weight_picks_the_newest(api):
    assert route(api, prompt="hello there", weights={"recency": 50})["expert"] == "gen-m"


def test_flags_set_weights_like_the_request(api):
    assert route(api, prompt="[flag: smallest] hello there")["expert"] == "gen-xs"
    assert route(api, prompt="hello there [flag: newest]")["expert"] == "gen-m"
    trusted = route(api, prompt="hello [flag: trusted]", experts=["gen-s", "gen-m"])
    assert trusted["expert"] == "gen-m"  # gen-s is untrusted


def test_allow_list_restricts_the_choice(api):
    body = route(api, prompt="hello there", experts=["gen-s"], weights={"size": 50})
    assert body["expert"] == "gen-s"
    assert [r["expert"] for r in body["ranking"]] == ["gen-s"]


def test_task_restricts_the_choice(api):
    body = route(api, prompt="The capital of France is [MASK].", task="fill-mask")
    assert body["expert"] == "mask-s"


def test_infer_generates_on_the_chosen_expert(api):
    r = api.post("/v1/infer", json={"prompt": "def main():", "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["expert"] == body["ranking"][0]["expert"]
    assert body["task"] == "text-generation"
    assert isinstance(body["output"], str)
    assert body["skipped"] == []
    assert r.headers["x-tryage-expert"] == body["expert"]


def test_a_sampled_answer_repeats_with_its_seed_and_varies_without_one(api):
    def sample(**seed) -> str:
        body = {"prompt": "def main():", "experts": ["gen-xs"], "max_new_tokens": 8}
        r = api.post("/v1/infer", json={**body, "temperature": 1.0, **seed})
        assert r.status_code == 200, r.text
        return r.json()["output"]

    assert sample(seed=-3) == sample(seed=-3)
    assert len({sample() for _ in range(4)}) > 1  # no seed: a new one each request


def test_infer_fills_masks(api):
    body = {"prompt": "The [MASK] sat on the mat.", "task": "fill-mask", "top_k": 3}
    r = api.post("/v1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["expert"] == "mask-s"
    assert len(out["output"]["masks"]) == 1
    assert len(out["output"]["masks"][0]) == 3
    assert "[MASK]" not in out["output"]["text"]


# --- OpenAI-compatible endpoints through the official client -------------------------------


def test_completions_route_and_name_the_expert(oai):
    raw = oai.completions.with_raw_response.create(model="tryage", prompt="Once upon", max_tokens=5)
    done = raw.parse()
    assert done.model in TEXT_GEN
    assert raw.headers["x-tryage-expert"] == done.model
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 5


def test_completions_pin_an_expert(oai):
    done = oai.completions.create(model="gen-m", prompt="Once upon", max_tokens=3)
    assert done.model == "gen-m"


def test_completions_take_routing_options(oai):
    done = oai.completions.create(
        model="tryage",
        prompt="Once upon",
        max_tokens=3,
        extra_body={"tryage": {"weights": {"size": 50}}},
    )
    assert done.model == "gen-xs"


def test_flags_are_removed_before_the_expert(oai):
    plain = oai.completions.create(model="gen-m", prompt="Once upon a time", max_tokens=2)
    flagged = oai.completions.create(
        model="gen-m", prompt="Once upon a time [flag: newest]", max_tokens=2
    )
    assert flagged.usage.prompt_tokens == plain.usage.prompt_tokens
    assert flagged.choices[0].text == plain.choices[0].text


def test_chat_completions(oai):
    raw = oai.chat.completions.with_raw_response.create(
        model="tryage",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime. [flag: smallest]"},
        ],
        max_tokens=4,
    )
    done = raw.parse()
    assert done.model == "gen-xs"
    assert raw.headers["x-tryage-expert"] == "gen-xs"
    assert done.choices[0].message.role == "assistant"
    assert isinstance(done.choices[0].message.content, str)


def test_openai_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-9", prompt="hi", max_tokens=2)


def test_openai_chat_streams_in_several_chunks_the_same_answer_with_usage(oai):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    stream = oai.chat.completions.create(
        model="gen-m", messages=messages, max_tokens=12, stream=True
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3, chunks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"gen-m"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    whole = oai.chat.completions.create(model="gen-m", messages=messages, max_tokens=12)
    assert "".join(texts) == whole.choices[0].message.content  # greedy: the same answer


def test_openai_stop_ends_the_answer_before_it_whole_and_streamed(oai):
    """OpenAI's `stop` and text content parts, through the official client: the answer is the
    one without `stop`, cut before the first stop string (not returned), finish_reason stop."""
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    whole = oai.chat.completions.create(model="gen-m", messages=messages, max_tokens=12)
    text = whole.choices[0].message.content
    stop = text[3:5]  # the smoke experts' text is random: a piece of this very answer
    cut = text[: text.find(stop)]
    assert len(cut) < len(text)
    parts = [{"type": "text", "text": "Tell me a story about a cat."}]  # the same text, in parts
    asked = {"model": "gen-m", "max_tokens": 12, "stop": [stop, "never said"]}
    done = oai.chat.completions.create(messages=[{"role": "user", "content": parts}], **asked)
    assert done.choices[0].message.content == cut
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens < whole.usage.completion_tokens  # stopped there
    chunks = list(oai.chat.completions.create(messages=messages, stream=True, **asked))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    prompt = oai.completions.create(model="gen-m", prompt="Once upon a time", max_tokens=12)
    first = prompt.choices[0].text
    done = oai.completions.create(
        model="gen-m", prompt="Once upon a time", max_tokens=12, stop=first[2:4]
    )
    assert done.choices[0].text == first[: first.find(first[2:4])]


def test_openai_completions_stream_is_server_sent_events_ending_with_done(api):
    body = {"model": "tryage", "prompt": "Once upon a time", "max_tokens": 6, "stream": True}
    with api.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-tryage-expert"] and r.headers["x-tryage-fallback"] == "false"
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["object"] == "text_completion" and last["usage"]["total_tokens"] > 0
    assert last["model"] == r.headers["x-tryage-expert"]


# --- bad input: 4xx in one shape, and the service keeps serving ----------------------------


BAD = [
    ("/v1/route", {"prompt": ""}, 400, "prompt"),
    ("/v1/route", {"prompt": "   "}, 400, "prompt"),
    ("/v1/route", {"prompt": "[flag: smallest]"}, 400, "prompt"),
    ("/v1/route", {"prompt": "x" * 40_000}, 400, "prompt"),
    ("/v1/route", {"prompt": "hi [flag: fastest]"}, 400, "prompt"),
    ("/v1/route", {"prompt": "hi", "weights": {"sise": 1.0}}, 400, "weights"),
    ("/v1/route", {"prompt": "hi", "weights": {"size": -1.0}}, 400, "weights"),
    ("/v1/route", {"prompt": "hi", "weights": {"size": "big"}}, 400, "weights.size"),
    ("/v1/route", {"prompt": "hi", "experts": ["nope"]}, 404, "experts"),
    ("/v1/route", {"prompt": "hi", "experts": []}, 400, "experts"),
    ("/v1/route", {"prompt": "hi", "experts": ["mask-s"], "task": "text-generation"}, 400, None),
    ("/v1/route", {"prompt": "no mask here", "task": "fill-mask"}, 400, "prompt"),
    ("/v1/route", {"prompt": "hi", "task": "translation"}, 400, "task"),
    ("/v1/route", {"prompt": "hi", "colour": "red"}, 400, "colour"),
    ("/v1/route", {}, 400, "prompt"),
    ("/v1/route", ["not", "an", "object"], 400, None),
    ("/v1/infer", {"prompt": "hi", "max_new_tokens": 100_000}, 400, "max_new_tokens"),
    ("/v1/infer", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("/v1/completions", {"model": "tryage", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": "tryage", "prompt": [1, 2, 3]}, 400, "prompt"),
    ("/v1/completions", {"model": "mask-s", "prompt": "the [MASK] sat"}, 400, "model"),
    (
        "/v1/chat/completions",
        {"model": "mask-s", "messages": [{"role": "user", "content": "hi"}]},
        400,
        "model",
    ),
    ("/v1/chat/completions", {"model": "tryage", "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": " "}]},
        400,
        "messages.1.content",  # the last user message is what is routed: empty, it is named
    ),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages.0.content",
    ),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100_000}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100_000},
        400,
        "max_completion_tokens",
    ),
    (
        "/v1/completions",
        {"model": "gen-m", "prompt": "hi", "tryage": {"experts": ["gen-s"]}},
        400,
        "tryage.experts",
    ),
    (
        "/v1/completions",
        {"model": "gen-m", "prompt": "hi", "tryage": {"experts": ["gen-m", "nope"]}},
        404,
        "experts",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "tryage",
            "messages": [
                {"role": "system", "content": "x" * 40_000},
                {"role": "user", "content": "hi"},
            ],
        },
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"model": "tryage", "messages": [{"role": "system", "content": "x"}]},
        400,
        "messages",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_input_is_a_4xx_in_the_error_shape(api, path, body, status, param):
    assert_error(api.post(path, json=body), status, param)


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"prompt": "hi", "weights": {"size": NaN}}',
        b'{"prompt": "hi", "weights": {"size": Infinity}}',
    ],
)
def test_malformed_or_non_finite_json_is_a_400(api, raw):
    r = api.post("/v1/route", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_unknown_path_and_method_use_the_error_shape(api):
    assert assert_error(api.get("/v1/nothing"), 404)["code"] == "not_found"
    err = assert_error(api.get("/v1/route"), 405)
    assert err["code"] == "method_not_allowed" and "GET" in err["message"]


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        (b'{"prompt": "caf\xe9"}', {}),  # Latin-1, not UTF-8
        (b"\x1f\x8b\x08\x00", {"content-encoding": "gzip"}),
    ],
)
def test_a_body_that_cannot_be_read_is_a_400_saying_what_to_send(api, raw, headers):
    r = api.post("/v1/route", content=raw, headers={"content-type": "application/json", **headers})
    err = assert_error(r, 400)
    assert err["code"] == "invalid_body" and "UTF-8" in err["message"]


def test_service_keeps_serving_after_bad_input(api):
    for path, body, _, _ in BAD:
        api.post(path, json=body)
    assert api.get("/healthz").json() == {"status": "ok"}
    assert route(api, prompt="still here?")["expert"] in TEXT_GEN


# --- batching -------------------------------------------------------------------------------


def test_router_batches_concurrent_prompts(api):
    from concurrent.futures import ThreadPoolExecutor

    router = serve.get_deployment_handle("Router", app_name="main")
    before = router.stats.remote().result()
    assert before["batching"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}
    assert before["threads"] == 1  # the smoke library: one thread a replica, up to two
    prompts = [f"prompt number {i}: what is {i} squared?" for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda p: api.post("/v1/route", json={"prompt": p}), prompts))
    assert all(a.status_code == 200 for a in answers)
    after = router.stats.remote().result()
    assert after["prompts"] - before["prompts"] == 32
    assert after["batches"] - before["batches"] < 32  # some prompts shared a batch


# --- tryage route: the offline decisions are the served ones -------------------------------


def test_offline_route_matches_the_service_row_by_row(api, smoke_library, tmp_path):
    from serve_app.cli import main

    prompts = [
        "def add(a, b):\n    return a + b",
        "The patient presented with chest pain.",
        "def add(a, b):\n    return a + b",  # a duplicate: still its own output row
        "[flag: smallest] hello there",
        "The capital of France is [MASK].",
        "hello [flag: nonsense]",  # refused, as the service refuses it
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": p, "domain": "d"}) + "\n" for p in prompts))
    out = tmp_path / "routed.jsonl"
    assert (
        main(["route", "--library", str(smoke_library), "--data", str(data), "--out", str(out)])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == prompts
    for row in rows[:-1]:
        served = route(api, prompt=row["text"])
        assert row["expert"] == served["expert"]
        offline = {r["expert"]: r for r in row["ranking"]}
        for r in served["ranking"]:
            assert offline[r["expert"]]["score"] == pytest.approx(r["score"], abs=1e-5)
            assert offline[r["expert"]]["penalties"] == pytest.approx(r["penalties"])
            assert "predicted_score" not in offline[r["expert"]]  # bits per byte, a loss
    assert rows[3]["ranking"][0]["penalties"]["size"] == 0  # the smallest: no size penalty
    assert rows[-1]["expert"] is None and "unknown flag" in rows[-1]["error"]
    assert rows[-1]["ranking"] is None
    assert api.post("/v1/route", json={"prompt": prompts[-1]}).status_code == 400
