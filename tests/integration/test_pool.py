"""A long-tail pool: experts served by one multiplexed deployment, loaded on demand, evicted
least recently used, routed and fallen back from like any other expert."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from ray import serve

from serve_app.app import build_graph
from serve_app.config import load_library
from tests.integration.conftest import client, undeploy
from tests.integration.engines import load_unloadable

APP = "pool"
POOLED = ("gen-xs", "gen-s", "mask-s")


@pytest.fixture(scope="module")
def api(serve_port, smoke_library) -> httpx.Client:
    # Three smoke experts in one pool whose single replica holds one expert at a time, so every
    # switch evicts; gen-m keeps its own deployment. gen-s's weights cannot be loaded.
    raw = yaml.safe_load(smoke_library.read_text())
    for expert in raw["experts"]:
        if expert["name"] in POOLED:
            expert.pop("resources")
            expert["pool"] = "longtail"
    raw["pools"] = {"longtail": {"max_models_per_replica": 1, "resources": {"num_cpus": 0}}}
    path = smoke_library.with_name("library-pooled.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    app = build_graph(load_library(path), load_experts={"gen-s": load_unloadable})
    serve.run(app, name=APP, route_prefix="/pool")
    with client(serve_port, "/pool") as c:
        yield c
    undeploy(APP)


def pool_info() -> dict:
    return serve.get_deployment_handle("Pool-longtail", app_name=APP).info.remote().result()


def infer(api, body: dict) -> dict:
    r = api.post("/v1/infer", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_pooled_experts_share_one_deployment_and_evict_least_recently_used(api):
    deployments = serve.status().applications[APP].deployments
    assert "Pool-longtail" in deployments and "gen-m" in deployments
    assert not set(POOLED) & set(deployments)  # no deployment of their own
    before = pool_info()
    for name in ("gen-xs", "mask-s", "gen-xs"):
        prompt = "The [MASK] sat." if name == "mask-s" else "Once upon a time"
        answer = infer(api, {"prompt": prompt, "experts": [name], "max_new_tokens": 3})
        assert answer["expert"] == name and answer["task"] == load_task(name)
    again = infer(api, {"prompt": "Twice upon a time", "experts": ["gen-xs"], "max_new_tokens": 2})
    assert again["expert"] == "gen-xs"
    after = pool_info()
    assert after["experts"] == ["gen-xs"]  # one slot: the last expert asked for
    assert after["loads"] - before["loads"] == 3  # gen-xs, mask-s, gen-xs again
    assert after["evictions"] - before["evictions"] == 2
    assert after["requests"] - before["requests"] == 4
    assert after["misses"] - before["misses"] == 3  # the fourth found gen-xs loaded
    assert after["rss_bytes"] > 0 and len(after["load_s"]) >= 3


def load_task(name: str) -> str:
    return "fill-mask" if name == "mask-s" else "text-generation"


def test_a_pooled_expert_that_cannot_load_falls_back_and_is_not_retried_at_once(api):
    # The size penalty puts gen-s (pooled, unloadable) ahead of gen-m (its own deployment).
    body = {"prompt": "hello", "experts": ["gen-s", "gen-m"], "weights": {"size": 50}}
    before = pool_info()
    for _ in range(2):
        answer = infer(api, {**body, "max_new_tokens": 3})
        assert answer["ranking"][0]["expert"] == "gen-s"
        assert answer["expert"] == "gen-m" and answer["skipped"] == ["gen-s"]
    after = pool_info()
    # One failed load, remembered: the second request fell back without a second try, and
    # the expert the replica held stayed loaded.
    assert after["loads"] == before["loads"] and after["evictions"] <= before["evictions"] + 1
    assert after["requests"] - before["requests"] == 2


def test_a_pooled_expert_streams_an_openai_chat(api):
    body = {
        "model": "gen-xs",
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 4,
        "stream": True,
    }
    with api.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["x-tryage-expert"] == "gen-xs"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["model"] == "gen-xs" and last["usage"]["completion_tokens"] >= 1
