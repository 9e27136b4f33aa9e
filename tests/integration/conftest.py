"""One local Ray instance and one Serve HTTP proxy for the whole integration session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smoke_library(tmp_path_factory) -> Path:
    """A smoke library built once for the session."""
    from serve_app.smoke import build_smoke_library

    return build_smoke_library(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Start Ray (4 logical CPUs on any machine) and Serve's HTTP proxy on a free port."""
    import ray
    from ray import serve

    # Ray workers import test helpers (tests.integration.engines) from the repo root.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def client(port: int, prefix: str = "") -> httpx.Client:
    """An HTTP client for an app served under `prefix`; cold starts can take a while."""
    return httpx.Client(base_url=f"http://127.0.0.1:{port}{prefix}", timeout=120)
