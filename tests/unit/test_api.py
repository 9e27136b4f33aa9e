"""The ingress's guard: API keys and body size, checked before FastAPI reads a request."""

from __future__ import annotations

from fastapi.testclient import TestClient

from serve_app.api import Guard, create_api
from serve_app.protocol import ChatRequest, RouteRequest


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
        return {"messages": len(body.messages)}

    return TestClient(api)


def test_keys_are_read_comma_separated():
    assert Guard.keys_from(" a, b ,,c ") == ["a", "b", "c"]
    assert Guard.keys_from(None) == []


def test_without_keys_every_request_passes():
    assert _client(Guard()).post("/echo", json={"a": 1}).json() == {"a": 1}


def test_with_keys_a_request_needs_a_bearer_key_but_healthz_does_not():
    client = _client(Guard(api_keys=["k1", "k2"]))
    r = client.post("/echo", json={})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    bad = client.post("/echo", json={}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    ok = client.post("/echo", json={"x": 2}, headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 200 and ok.json() == {"x": 2}
    assert client.get("/healthz").status_code == 200


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
