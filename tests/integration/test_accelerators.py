"""Accelerators only where routed, on a local multi-node Ray cluster with logical GPUs.

The router and every expert ask Ray for one GPU (`build_smoke_library(gpus=True)`). GPUs in use,
read from Ray's own accounting (cluster resources minus available resources), must be 1 when
the service is idle (the router's), 2 while one expert serves a routed prompt, and 1 again once
that expert's idle window has passed. The GPUs are logical: Ray hands them out, but torch sees
no CUDA device here, so the replica must run on the CPU.

This module starts its own cluster, so it runs before the session's shared Ray (conftest).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from serve_app.app import build_app
from serve_app.demo.smoke import build_smoke_library
from tests.integration.conftest import ROOT, free_port, wait_for, with_autoscaling

pytestmark = pytest.mark.own_ray

GPU_NODES = 3  # room for the router, one expert and a spare: idle use is not a full cluster
IDLE_S = 3.0  # the experts' idle window before they give their GPU back
APP = "gpus"
# Handles and replicas report their load every `metrics_interval_s` (10 s by default; Ray 2.60
# still reads this deprecated field, not the RAY_SERVE_*_METRIC_PUSH_INTERVAL_S variables), and
# the autoscaler averages over `look_back_period_s`: both short, so the idle window is IDLE_S.
FAST_AUTOSCALING = {
    "downscale_delay_s": IDLE_S,
    "downscale_to_zero_delay_s": IDLE_S,
    "upscale_delay_s": 0.0,
    "look_back_period_s": 2.0,
    "metrics_interval_s": 0.5,
}


def gpus_in_use() -> float:
    """GPUs held by actors, from Ray's resource accounting."""
    return ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)


def running(deployment: str) -> int:
    """Running replicas of a deployment of the app."""
    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A CPU head and GPU_NODES worker nodes with one logical GPU each, and Serve on it."""
    assert not ray.is_initialized(), "this module needs its own Ray; it must run first"
    with pytest.MonkeyPatch.context() as env:
        # Raylets, and so every worker, inherit the driver's environment.
        env.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)
        # The Cluster helper records its address in <temp dir>/ray/ray_current_cluster, where
        # any `ray.init()` or `serve run` without an address on this machine would find it and
        # join this test's cluster: a temp dir of its own keeps it private.
        tmp = tempfile.mkdtemp(prefix="tryage-gpus-", dir="/tmp")  # short: socket paths
        env.setenv("RAY_TMPDIR", tmp)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
        )
        for _ in range(GPU_NODES):
            cluster.add_node(num_cpus=2, num_gpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        try:
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def api(cluster, tmp_path_factory):
    library = build_smoke_library(tmp_path_factory.mktemp("gpu-smoke"), gpus=True)
    fast = with_autoscaling(library, **FAST_AUTOSCALING)
    serve.run(build_app({"library": str(fast)}), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{cluster}", timeout=120) as client:
        yield client
    serve.delete(APP)


def test_cluster_has_gpus_to_spare(cluster):
    assert ray.cluster_resources().get("GPU") == GPU_NODES


def test_gpus_only_where_routed(api):
    # Idle: the router holds its GPU, every expert is at zero replicas.
    wait_for(lambda: gpus_in_use() == 1, 30, "GPUs in use to settle at 1 (the router's)")
    assert running("Router") == 1
    assert all(running(name) == 0 for name in ("gen-xs", "gen-s", "gen-m", "mask-s"))

    # A routed prompt: the smallest expert is chosen, cold-starts and takes a GPU.
    seen: list[float] = []
    answer: list[httpx.Response] = []
    body = {"prompt": "hello there", "weights": {"size": 50}, "max_new_tokens": 4}
    request = threading.Thread(target=lambda: answer.append(api.post("/v1/infer", json=body)))
    request.start()
    while request.is_alive():
        seen.append(gpus_in_use())
        time.sleep(0.05)
    request.join()
    assert answer[0].status_code == 200, answer[0].text
    assert answer[0].json()["expert"] == "gen-xs"
    assert max(seen) == 2, f"GPUs in use while the expert served: {sorted(set(seen))}"
    assert gpus_in_use() == 2  # the expert keeps its GPU for its idle window
    assert running("gen-xs") == 1
    assert all(running(name) == 0 for name in ("gen-s", "gen-m", "mask-s"))

    # Ray gave the replica a GPU, but torch sees none here, so it runs on the CPU.
    info = serve.get_deployment_handle("gen-xs", app_name=APP).info.remote().result()
    assert len(info["ray_gpu_ids"]) == 1
    assert info["device"] == "cpu"

    # After the idle window the expert scales to zero and gives its GPU back; the router keeps its.
    wait_for(lambda: gpus_in_use() == 1, 60, "the expert to give its GPU back")
    assert running("gen-xs") == 0
    assert running("Router") == 1
