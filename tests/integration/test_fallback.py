"""Fallback: when the chosen expert fails or hangs, the next one in the ranking answers."""

from __future__ import annotations

import time

import httpx
import pytest
from ray import serve

from serve_app.app import build_graph
from serve_app.config import load_library
from tests.integration.conftest import client, undeploy, wait_for, warm
from tests.integration.engines import (
    fault_marker,
    load_broken,
    load_device_fault_once,
    load_no_system_role,
    load_slow,
    load_wedging_router,
    wedge_marker,
)

TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def api(serve_port, smoke_library) -> httpx.Client:
    # The smoke library, but gen-xs (the smallest) fails whenever it generates and gen-s (the
    # next smallest) hangs; an expert gets TIMEOUT_S to answer.
    # mask-s's device breaks on its first request; Serve checks its health every second.
    library = load_library(smoke_library)
    ingress = library.ingress.model_copy(update={"expert_timeout_s": TIMEOUT_S})
    fault_marker(library.expert("mask-s").model).unlink(missing_ok=True)
    experts = [
        e.model_copy(update={"health_check_period_s": 1.0}) if e.name == "mask-s" else e
        for e in library.experts
    ]
    app = build_graph(
        library.model_copy(update={"ingress": ingress, "experts": experts}),
        load_experts={
            "gen-xs": load_broken,
            "gen-s": load_slow,
            "mask-s": load_device_fault_once,
        },
    )
    serve.run(app, name="fallback", route_prefix="/fallback")
    # Start the generators now, so the short timeout measures answers, not cold starts.
    warm({"fallback": ("gen-xs", "gen-s", "gen-m")})
    with client(serve_port, "/fallback") as c:
        yield c
    undeploy("fallback")


def infer(api, experts: list[str]) -> dict:
    body = {"prompt": "hello", "weights": {"size": 50}, "max_new_tokens": 3, "experts": experts}
    r = api.post("/v1/infer", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_failed_expert_falls_back_to_the_next_in_ranking(api):
    out = infer(api, ["gen-xs", "gen-m"])
    assert [r["expert"] for r in out["ranking"]] == ["gen-xs", "gen-m"]
    assert out["skipped"] == ["gen-xs"]
    assert out["expert"] == "gen-m"
    assert isinstance(out["output"], str)


def test_hung_expert_times_out_to_the_next_in_ranking(api):
    out = infer(api, ["gen-s", "gen-m"])
    assert out["skipped"] == ["gen-s"]
    assert out["expert"] == "gen-m"


def test_openai_answer_names_the_expert_that_answered(api):
    body = {"model": "tryage", "prompt": "hi", "max_tokens": 2, "tryage": {"weights": {"size": 50}}}
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gen-m"  # gen-xs failed, gen-s timed out
    assert r.headers["x-tryage-expert"] == "gen-m"


def test_no_working_expert_is_a_503_and_the_service_survives(api):
    r = api.post("/v1/infer", json={"prompt": "hello", "experts": ["gen-xs"]})
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "service_unavailable_error"
    assert "simulated" not in err["message"]  # internal detail stays in the logs
    assert api.get("/healthz").json() == {"status": "ok"}


def test_a_replica_whose_device_broke_is_replaced_and_serves_again(api):
    body = {"prompt": "The [MASK] sat on the mat.", "experts": ["mask-s"], "top_k": 2}
    r = api.post("/v1/infer", json=body)
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    # check_health now fails: Serve replaces the replica, and the new one answers.
    wait_for(lambda: api.post("/v1/infer", json=body).status_code == 200, 90, "a new replica")
    assert api.get("/healthz").json() == {"status": "ok"}


def test_a_client_that_leaves_a_stream_stops_the_generation(api):
    # gen-s streams a token every 0.1 s: 200 tokens would take 20 s.
    handle = serve.get_deployment_handle("gen-s", app_name="fallback")
    body = {
        "model": "gen-s",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 200,
        "stream": True,
    }
    left = time.monotonic()
    with api.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = r.iter_lines()
        assert [next(events) for _ in range(3)]  # the role, then tokens: it is generating
        assert handle.info.remote().result()["streaming"] == 1
    # The client has gone: the expert stops at its next token, long before 20 s.
    wait_for(lambda: handle.info.remote().result()["streaming"] == 0, 10, "the stream to stop")
    assert time.monotonic() - left < 15


def test_a_stream_whose_replica_dies_ends_with_an_error_chunk_and_done(api):
    # gen-s streams a token every 0.1 s; its replica is killed mid-stream, as a crash would.
    import json

    import ray

    body = {"model": "gen-s", "prompt": "Tell me everything.", "max_tokens": 200, "stream": True}
    with api.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert [next(lines) for _ in range(3)]  # tokens are coming
        prefix = "SERVE_REPLICA::fallback#gen-s#"
        (name,) = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)
        ]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "error"


#: The deadline of a request to the "refusals" app: its router may hang (WedgingRouter).
DEADLINE_S = 8.0


@pytest.fixture(scope="module")
def refusing(serve_port, smoke_library) -> httpx.Client:
    # The smoke library, but gen-xs's chat template refuses a system message, gen-s hangs,
    # and the router's device hangs while its wedge marker exists.
    library = load_library(smoke_library)
    wedge_marker(library.router.checkpoint).unlink(missing_ok=True)
    ingress = library.ingress.model_copy(update={"request_timeout_s": DEADLINE_S})
    app = build_graph(
        library.model_copy(update={"ingress": ingress}),
        load_router=load_wedging_router,
        load_experts={"gen-xs": load_no_system_role, "gen-s": load_slow},
    )
    serve.run(app, name="refusals", route_prefix="/refusals")
    warm({"refusals": ("gen-xs", "gen-s", "gen-m")})
    with client(serve_port, "/refusals") as c:
        yield c
    wedge_marker(library.router.checkpoint).unlink(missing_ok=True)
    undeploy("refusals")


def chat(model: str, experts: list[str] | None = None) -> dict:
    """A chat with a system message, routed among `experts` or pinned to `model`."""
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
        ],
        "max_tokens": 3,
    }
    if experts:
        body["tryage"] = {"experts": experts, "weights": {"size": 50}}
    return body


def test_an_expert_that_refuses_the_request_passes_it_to_the_next(refusing):
    # gen-xs ranks first, and its template refuses the system message: gen-m answers.
    r = refusing.post("/v1/chat/completions", json=chat("tryage", ["gen-xs", "gen-m"]))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gen-m"
    assert r.headers["x-tryage-fallback"] == "true"
    stream = {**chat("tryage", ["gen-xs", "gen-m"]), "stream": True}
    r = refusing.post("/v1/chat/completions", json=stream)
    assert r.status_code == 200 and r.headers["x-tryage-expert"] == "gen-m", r.text
    assert r.text.rstrip().endswith("data: [DONE]")


def test_a_request_every_expert_refuses_is_a_400_naming_why(refusing):
    for body in (chat("gen-xs"), {**chat("gen-xs"), "stream": True}):
        r = refusing.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "System role not supported" in err["message"]
    assert refusing.post("/v1/chat/completions", json=chat("gen-m")).status_code == 200


def test_a_hung_router_is_a_503_at_the_deadline_and_the_service_recovers(refusing, smoke_library):
    marker = wedge_marker(load_library(smoke_library).router.checkpoint)
    marker.write_text("wedged")
    try:
        start = time.monotonic()
        r = refusing.post("/v1/route", json={"prompt": "hello"})
        waited = time.monotonic() - start
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["code"] == "no_expert_available"
        assert DEADLINE_S - 1 < waited < DEADLINE_S + 20
    finally:
        marker.unlink(missing_ok=True)
    r = refusing.post("/v1/route", json={"prompt": "hello"})
    assert r.status_code == 200, r.text


def test_the_router_s_wait_counts_against_the_request_s_deadline(refusing, smoke_library):
    # The router answers after 4 s, and the expert it picks hangs: the request ends at its
    # deadline (8 s from arrival), not a whole deadline after routing.
    import threading

    marker = wedge_marker(load_library(smoke_library).router.checkpoint)
    marker.write_text("wedged")
    threading.Timer(4.0, lambda: marker.unlink(missing_ok=True)).start()
    start = time.monotonic()
    r = refusing.post("/v1/infer", json={"prompt": "hello", "experts": ["gen-s"]})
    waited = time.monotonic() - start
    assert r.status_code == 503, r.text
    assert "deadline" in r.json()["error"]["message"]
    assert DEADLINE_S - 1 < waited < DEADLINE_S + 3
