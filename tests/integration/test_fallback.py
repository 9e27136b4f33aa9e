"""Fallback: when the chosen expert fails, the next one in the ranking answers."""

from __future__ import annotations

import httpx
import pytest
from ray import serve

from serve_app.app import build_graph
from serve_app.config import load_library
from tests.integration.conftest import client
from tests.integration.engines import load_broken


@pytest.fixture(scope="module")
def api(serve_port, smoke_library) -> httpx.Client:
    # The same library, but gen-xs (the smallest) fails whenever it generates.
    app = build_graph(load_library(smoke_library), load_experts={"gen-xs": load_broken})
    serve.run(app, name="fallback", route_prefix="/fallback")
    with client(serve_port, "/fallback") as c:
        yield c
    serve.delete("fallback")


def test_failed_expert_falls_back_to_the_next_in_ranking(api):
    body = {"prompt": "hello", "weights": {"size": 50}, "max_new_tokens": 3}
    r = api.post("/v1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ranking"][0]["expert"] == "gen-xs"
    assert out["skipped"] == ["gen-xs"]
    assert out["expert"] == out["ranking"][1]["expert"]
    assert isinstance(out["output"], str)


def test_openai_answer_names_the_expert_that_answered(api):
    body = {
        "model": "tryage",
        "prompt": "hello",
        "max_tokens": 2,
        "tryage": {"weights": {"size": 50}},
    }
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gen-s"  # next smallest after the failing gen-xs
    assert r.headers["x-tryage-expert"] == "gen-s"


def test_no_working_expert_is_a_503_and_the_service_survives(api):
    r = api.post("/v1/infer", json={"prompt": "hello", "experts": ["gen-xs"]})
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "service_unavailable_error"
    assert "simulated" not in err["message"]  # internal detail stays in the logs
    assert api.get("/healthz").json() == {"status": "ok"}
