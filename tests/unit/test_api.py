"""The ingress's guard: API keys and body size, checked before FastAPI reads a request."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.testclient import TestClient

from deployments.ingress import _head
from serve_app.api import Guard, create_api, key_digest
from serve_app.protocol import ChatRequest, CompletionRequest, ModelCard, RouteRequest


def _client(guard: Guard) -> TestClient:
    api = create_api()
    api.state.guard = guard

    @api.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.post("/route")
    async def route(body: RouteRequest) -> dict:
        return {"prompt": body.prompt}

    @api.post("/chat")
    async def chat(body: ChatRequest) -> dict:
        return {"messages": len(body.messages), "texts": [m.content for m in body.messages]}

    @api.post("/completions")
    async def completions(body: CompletionRequest) -> dict:
        return {"stop": body.stop}

    @api.get("/conflict")
    async def conflict() -> dict:
        raise HTTPException(409, detail="taken {twice}", headers={"x-why": "test"})

    return TestClient(api)


def test_keys_are_read_comma_separated():
    assert Guard.keys_from(" a, b ,,c ") == ["a", "b", "c"]
    assert Guard.keys_from(None) == []


def test_without_keys_every_request_passes():
    assert _client(Guard()).post("/echo", json={"a": 1}).json() == {"a": 1}


def test_with_keys_a_request_needs_a_bearer_key_but_healthz_does_not():
    environ = {"TRYAGE_API_KEYS": "k1", "TRYAGE_API_KEY_DIGESTS": key_digest("k2")}
    client = _client(Guard(key_digests=Guard.digests_from(environ)))
    r = client.post("/echo", json={})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    bad = client.post("/echo", json={}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    ok = client.post("/echo", json={"x": 2}, headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 200 and ok.json() == {"x": 2}
    assert client.post("/echo", json={}, headers={"Authorization": "Bearer k1"}).status_code == 200
    digest = {"Authorization": f"Bearer {key_digest('k2')}"}  # the digest is not a key
    assert client.post("/echo", json={}, headers=digest).status_code == 401
    assert client.get("/healthz").status_code == 200


def test_refusals_at_the_guard_are_counted_by_reason():
    # ray_tryage_rejections_total: a 401 or a 413 is refused before FastAPI sees the request,
    # so the guard counts it (the error handlers count the rest).
    class Rejections(list):
        def rejected(self, endpoint: str, reason: str) -> None:
            self.append((endpoint, reason))

    client = _client(Guard(max_body_bytes=1024, key_digests=[key_digest("k")]))
    client.app.state.telemetry = counted = Rejections()
    client.post("/echo", json={})
    key = {"Authorization": "Bearer k"}
    client.post("/echo", content=b"x" * 2000, headers={**key, "content-type": "application/json"})
    assert client.post("/echo", json={"a": 1}, headers=key).status_code == 200
    assert counted == [("/echo", "invalid_api_key"), ("/echo", "body_too_large")]


def test_a_body_over_the_limit_is_a_413_in_the_error_shape():
    client = _client(Guard(max_body_bytes=1024))
    r = client.post("/echo", content=b'{"a": "' + b"x" * 5000 + b'"}')
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.post("/echo", json={"a": "x" * 100}).status_code == 200


def test_a_streamed_body_over_the_limit_is_refused_too():
    client = _client(Guard(max_body_bytes=1024))

    def chunks():
        for _ in range(10):
            yield b"x" * 512

    r = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_lone_surrogate_is_a_400_naming_the_field_that_holds_it():
    client = _client(Guard())
    for path, body, where in (
        ("/route", b'{"prompt": "hi \\ud800 there"}', "prompt"),
        ("/route", b'{"prompt": "hi", "weights": {"size": 1, "\\udfff": 2}}', "weights"),
        (
            "/chat",
            b'{"messages": [{"role": "user", "content": "ok"}, '
            b'{"role": "user", "content": "\\ud800"}]}',
            "messages.1.content",
        ),
    ):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == where
        assert error["message"].startswith(f"{where}: text must be valid Unicode; it holds a lone")
    # Pydantic's own messages keep their field too.
    r = client.post("/route", json={"prompt": 3})
    assert r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["message"].startswith("prompt: ")


def test_a_message_s_text_parts_are_its_text_and_other_parts_a_400():
    client = _client(Guard())
    parts = [{"type": "text", "text": "Summarise this:"}, {"type": "text", "text": "a b c"}]
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": parts}]
    r = client.post("/chat", json={"messages": messages})
    assert r.json()["texts"] == ["terse", "Summarise this:\na b c"]
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    r = client.post("/chat", json={"messages": [{"role": "user", "content": [image]}]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages.0.content"
    assert "not a text part" in error["message"] and "'image_url'" in error["message"]
    r = client.post("/chat", json={"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert r.status_code == 400
    assert "a text part without a string 'text'" in r.json()["error"]["message"]


def test_stop_is_one_string_or_up_to_four_and_anything_else_a_400_naming_it():
    client = _client(Guard())
    for stop, kept in (("\n", ["\n"]), (["a", "b"], ["a", "b"]), (None, None), ([], [])):
        assert client.post("/completions", json={"prompt": "hi", "stop": stop}).json() == {
            "stop": kept
        }
    for stop, words in (
        (["a"] * 5, "at most 4 stop strings"),
        ("", "1 to 256 characters"),
        (["ok", "x" * 257], "1 to 256 characters"),
        (3, "valid list"),
    ):
        r = client.post("/completions", json={"prompt": "hi", "stop": stop})
        assert r.status_code == 400, (stop, r.text)
        assert r.json()["error"]["param"].startswith("stop"), r.json()
        assert words in r.json()["error"]["message"]


def test_a_json_response_format_is_refused_not_silently_ignored():
    client = _client(Guard())
    for fine in ({"response_format": None}, {"response_format": {"type": "text"}}):
        assert client.post("/completions", json={"prompt": "hi", **fine}).status_code == 200
    for asked, param in (
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ):
        r = client.post("/completions", json={"prompt": "hi", **asked})
        assert r.status_code == 400, asked
        assert r.json()["error"]["param"] == param


def test_tools_are_ignored_but_a_forced_tool_call_is_a_400_naming_it():
    client = _client(Guard())
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    for fine in ({}, {"tool_choice": "auto"}, {"tool_choice": "none"}, {"function_call": "auto"}):
        r = client.post("/completions", json={"prompt": "hi", "tools": [tool], **fine})
        assert r.status_code == 200, (fine, r.text)
    allowed = {"type": "allowed_tools", "allowed_tools": {"tools": [tool], "mode": "auto"}}
    r = client.post("/completions", json={"prompt": "hi", "tools": [tool], "tool_choice": allowed})
    assert r.status_code == 200, r.text  # OpenAI's allowed_tools in auto mode forces nothing
    named = {"type": "function", "function": {"name": "get_weather"}}
    for field, forced in (
        ("tool_choice", "required"),
        ("tool_choice", named),
        ("tool_choice", {**allowed, "allowed_tools": {"tools": [tool], "mode": "required"}}),
        ("function_call", {"name": "get_weather"}),
    ):
        r = client.post("/completions", json={"prompt": "hi", "tools": [tool], field: forced})
        assert r.status_code == 400, (field, forced)
        error = r.json()["error"]
        assert error["param"] == field
        assert "forced tool call" in error["message"] and "cannot call tools" in error["message"]
    for malformed in ("bogus", 5, {"type": "allowed_tools", "allowed_tools": "auto"}):
        body = {"prompt": "hi", "tool_choice": malformed}
        r = client.post("/completions", json=body)
        assert r.status_code == 400, (malformed, r.text)  # not a 500
        assert "is not a tool choice" in r.json()["error"]["message"]


def test_an_assistant_turn_without_text_is_empty_but_another_role_s_is_a_400():
    client = _client(Guard())
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": "c1"},
        {"role": "assistant"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    r = client.post("/chat", json={"messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["texts"] == ["weather in Paris?", "", "18 C, sunny", "", "and tomorrow?"]
    for message in ({"role": "user", "content": None}, {"role": "tool"}):
        r = client.post("/chat", json={"messages": [message]})
        assert r.status_code == 400, message
        assert r.json()["error"]["param"] == "messages.0.content"


def test_completion_options_whose_answer_would_lack_what_they_ask_for_are_a_400():
    client = _client(Guard())
    for fine in (
        {"echo": False},
        {"best_of": 1},
        {"suffix": None},
        {"suffix": ""},
        {"logit_bias": {}},
        {"logit_bias": None},
        {"logit_bias": {"50256": 0}},  # changes nothing
    ):
        r = client.post("/completions", json={"prompt": "hi", **fine})
        assert r.status_code == 200, (fine, r.text)
    for field, value in (
        ("echo", True),
        ("best_of", 3),
        ("suffix", "\n    return x"),
        ("logit_bias", {"50256": -100}),
    ):
        r = client.post("/completions", json={"prompt": "hi", field: value})
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field


def test_the_framework_s_own_errors_get_codes_and_others_keep_their_detail_and_headers():
    client = _client(Guard())
    r = client.get("/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"] == {
        "message": "/completions does not take GET; it takes POST",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
    }
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    gzip = {"content-type": "application/json", "content-encoding": "gzip"}
    r = client.post("/route", content=b"\x1f\x8b\x08\x00", headers=gzip)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"
    # an HTTPException of the app's own is passed on as it is, braces and headers included
    r = client.get("/conflict")
    assert r.status_code == 409 and r.headers["x-why"] == "test"
    assert r.json()["error"]["message"] == "taken {twice}"


def test_a_body_that_is_not_a_json_object_is_a_400_saying_what_to_send():
    client = _client(Guard())

    def message(**kw) -> str:
        r = client.post("/route", **kw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body", r.text
        return r.json()["error"]["message"]

    assert message().startswith("the body is empty")
    r = client.post("/route", content=b"  \n", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is empty")
    # curl -d without a content type sends a form's; so does a text/plain one
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert "(it came as application/x-www-form-urlencoded)" in message(
        content=b'{"prompt": "hi"}', headers=form
    )
    assert "content-type: application/json" in message(
        content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"}
    )
    assert message(json=["hi"]) == "the body must be a JSON object, not an array"
    assert message(json="hi") == "the body must be a JSON object, not a string"
    # valid JSON nested past the parser's depth: not a question of encoding alone
    deep = b"[" * 50_000 + b"]" * 50_000
    assert "nested" in message(content=deep, headers={"content-type": "application/json"})


def test_a_refusal_part_is_an_assistant_s_and_holds_a_string():
    client = _client(Guard())
    refusal = {"type": "refusal", "refusal": "I can't."}
    for messages, where in (
        ([{"role": "user", "content": [refusal]}], "messages.0.content"),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": 3}]},
                {"role": "user", "content": "hi"},
            ],
            "messages.1.content",
        ),
    ):
        r = client.post("/chat", json={"messages": messages})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == where and "refusal" in r.json()["error"]["message"]


def test_head_carries_the_length_get_s_body_has():
    # GET's body is pydantic's JSON (5e-5 where json.dumps writes 5e-05): HEAD must match it.
    card = ModelCard(
        id="remote-é",
        task="text-generation",
        params=None,
        released="2025-01-01",
        description="priced in millionths: ünïcode",
        trusted=False,
        price={"input_per_mtok": 5e-05, "output_per_mtok": 1e-7},
    )
    api = create_api()

    @api.get("/card")
    async def get_card() -> ModelCard:
        return card

    @api.head("/card")
    async def head_card():
        return _head(card)

    client = TestClient(api)
    got, head = client.get("/card"), client.head("/card")
    assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == got.headers["content-type"]
