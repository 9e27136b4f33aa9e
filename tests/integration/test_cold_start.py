"""Cold starts: requests to an expert at zero replicas wait for it to start and are answered."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve

from serve_app.app import build_app
from tests.integration.conftest import client, undeploy, wait_for, with_autoscaling

APP = "cold"
EXPERT = "gen-m"
# A short idle window (and metrics reported often enough to see it) so the test can watch the
# expert go back to zero and cold-start again.
FAST_AUTOSCALING = {
    "downscale_delay_s": 1.0,
    "downscale_to_zero_delay_s": 1.0,
    "look_back_period_s": 2.0,
    "metrics_interval_s": 0.5,
}


def running(deployment: str) -> int:
    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def api(serve_port, smoke_library) -> httpx.Client:
    library = with_autoscaling(smoke_library, **FAST_AUTOSCALING)
    serve.run(build_app({"library": str(library)}), name=APP, route_prefix=f"/{APP}")
    with client(serve_port, f"/{APP}") as c:
        yield c
    undeploy(APP)


def infer(api: httpx.Client, i: int) -> httpx.Response:
    body = {"prompt": f"cold start {i}", "experts": [EXPERT], "max_new_tokens": 3}
    return api.post("/v1/infer", json=body)


def test_requests_at_zero_replicas_wait_and_are_answered(api):
    assert running(EXPERT) == 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda i: infer(api, i), range(6)))
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["expert"] == EXPERT
        assert r.json()["skipped"] == []  # answered by the cold expert, not a fallback
    assert running(EXPERT) >= 1


def test_an_expert_back_at_zero_cold_starts_again(api):
    infer(api, 0)
    wait_for(lambda: running(EXPERT) == 0, 60, f"{EXPERT} to scale back to zero")
    r = infer(api, 1)
    assert r.status_code == 200, r.text
    assert r.json()["expert"] == EXPERT
    assert running(EXPERT) == 1
