"""Faults: an expert replica and then the router replica die (ray.kill) during a burst of
requests. Every request ends in an answer (a fallback at worst) or a 503 with Retry-After
within the deadline, and the service recovers; the time to recover is measured."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve

from serve_app.app import build_app
from serve_app.config import ROUTER_DEPLOYMENT
from tests.integration.conftest import ROOT, client, undeploy, wait_for, with_autoscaling

APP = "faults"
#: The expert killed: the smallest, so a large size weight ranks it first and its replica holds
#: the burst's first attempts; it keeps exactly one replica for the test to kill.
EXPERT = "gen-xs"
FAST_AUTOSCALING = {"upscale_delay_s": 0.5, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
#: Each half of the burst: requests, at most this many at once.
HALF_BURST, AT_ONCE = 12, 6
#: Seconds a request may take: the library's deadline, cold starts of the fallbacks included.
DEADLINE_S = 120
#: Seconds the service may take to answer again after a kill (a replica restarts on 2 cores).
RECOVERY_S = 120
RESULTS = ROOT / "bench" / "results" / "faults.json"


def faults_library(smoke_library: Path) -> Path:
    """The smoke library with short autoscaling delays and one replica of EXPERT always up."""
    raw = yaml.safe_load(with_autoscaling(smoke_library, **FAST_AUTOSCALING).read_text())
    for expert in raw["experts"]:
        if expert["name"] == EXPERT:
            # One replica, never more: the kill leaves it none until Serve replaces it.
            expert["autoscaling"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    out = smoke_library.with_name("library-faults.yaml")
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def api(serve_port, smoke_library) -> httpx.Client:
    library = faults_library(smoke_library)
    serve.run(build_app({"library": str(library)}), name=APP, route_prefix=f"/{APP}")
    with client(serve_port, f"/{APP}") as c:
        r = c.post(
            "/v1/infer", json={"prompt": "warm up", "experts": [EXPERT], "max_new_tokens": 2}
        )
        assert r.status_code == 200, r.text
        yield c
    undeploy(APP)


def replica_names(deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment of APP (Serve's namespace)."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    ]


def kill_replica(deployment: str) -> float:
    """Kill one replica of `deployment` the way a crash would; returns when it was killed."""
    names = replica_names(deployment)
    assert names, f"no live replica of {deployment}"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
    return time.monotonic()


def infer(api: httpx.Client, i: int) -> dict:
    """One burst request; what the client saw and how long it took."""
    body = {"prompt": f"request {i}: tell me", "weights": {"size": 50}, "max_new_tokens": 48}
    start = time.monotonic()
    try:
        r = api.post("/v1/infer", json=body, timeout=DEADLINE_S)
    except httpx.TimeoutException:
        return {"i": i, "status": "timeout", "start": start, "end": time.monotonic()}
    out = {"i": i, "status": r.status_code, "start": start, "end": time.monotonic()}
    out["retry_after"] = r.headers.get("retry-after")
    if r.status_code == 200:
        out["expert"] = r.json()["expert"]
    else:
        out["error"] = r.text[:200]
    return out


def burst_with_a_kill(
    api: httpx.Client, first: int, deployment: str, recovered: Callable[[], bool]
) -> dict:
    """Send HALF_BURST requests, AT_ONCE at a time; once two are answered kill a replica of
    `deployment`, then poll `recovered` until it holds. Returns the burst's results, how many
    requests were in flight at the kill, the seconds from the kill to recovery and the
    seconds the burst took."""
    done = threading.Semaphore(0)
    start = time.monotonic()
    with ThreadPoolExecutor(AT_ONCE) as pool:
        futures: list[Future] = []
        for i in range(first, first + HALF_BURST):
            future = pool.submit(infer, api, i)
            future.add_done_callback(lambda _: done.release())
            futures.append(future)
        for _ in range(2):
            assert done.acquire(timeout=DEADLINE_S), "the burst's first answers never came"
        killed_at = kill_replica(deployment)
        wait_for(recovered, RECOVERY_S, f"the service to recover from killing {deployment}")
        recovery_s = time.monotonic() - killed_at
        results = [f.result() for f in futures]
    return {
        "results": results,
        "in_flight_at_kill": sum(r["start"] < killed_at < r["end"] for r in results),
        "recovery_s": recovery_s,
        "burst_s": time.monotonic() - start,
    }


@pytest.mark.slow  # kills and waits for recovery six times: about 90 s on 2 CPUs (-m slow)
def test_killed_replicas_cost_no_request_its_answer_and_the_service_recovers(api):
    def expert_answers() -> bool:
        body = {"prompt": "are you back?", "experts": [EXPERT], "max_new_tokens": 2}
        return api.post("/v1/infer", json=body).status_code == 200

    def router_answers() -> bool:
        return api.post("/v1/route", json={"prompt": "are you back?"}).status_code == 200

    expert = burst_with_a_kill(api, 0, EXPERT, expert_answers)
    router = burst_with_a_kill(api, HALF_BURST, ROUTER_DEPLOYMENT, router_answers)
    # After both kills, the full path works again: route, then answer on the restarted expert.
    assert expert_answers() and router_answers()

    results = expert["results"] + router["results"]
    summary = {
        "requests": len(results),
        "at_once": AT_ONCE,
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "answered_by": dict(Counter(r.get("expert", "-") for r in results)),
        "max_request_s": round(max(r["end"] - r["start"] for r in results), 2),
        "kills": {
            name: {
                "in_flight_at_kill": run["in_flight_at_kill"],
                "recovery_s": round(run["recovery_s"], 2),
                "burst_s": round(run["burst_s"], 2),
                "statuses": dict(Counter(str(r["status"]) for r in run["results"])),
            }
            for name, run in ((f"expert {EXPERT}", expert), ("router", router))
        },
    }
    print(f"\nfaults: {json.dumps(summary, indent=1)}")
    if os.environ.get("TRYAGE_WRITE_RESULTS") == "1":
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=1) + "\n")

    bad = [
        r
        for r in results
        if not (r["status"] == 200 or (r["status"] == 503 and r.get("retry_after")))
        or r["end"] - r["start"] > DEADLINE_S
    ]
    assert not bad, f"requests neither answered nor refused with Retry-After in time: {bad}"
    # Requests outlived the kill of the chosen expert: a fallback or its new replica answered.
    assert any(r["status"] == 200 for r in expert["results"]), expert["results"]
