"""One local Ray instance and one Serve HTTP proxy for the whole integration session."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.session import free_port, workers_import_checkout

ROOT = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "own_ray: the module starts its own Ray cluster (run before the shared one)"
    )


def pytest_collection_modifyitems(items):
    """Unit tests first (seconds, and they need no Ray); then integration modules with their
    own Ray, as one driver holds one Ray and the shared session Ray (`serve_port`) stays up
    until the end once started; then the rest."""
    unit = ROOT / "tests" / "unit"
    items.sort(
        key=lambda item: (
            not item.path.is_relative_to(unit),
            item.get_closest_marker("own_ray") is None,
        )
    )


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Start Ray (4 logical CPUs on any machine) and Serve's HTTP proxy on a free port."""
    import ray
    from ray import serve

    # Ray workers import test helpers (tests.integration.engines) from the repo root.
    workers_import_checkout()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    # No serve.shutdown() first: it waits for every replica to drain (2 s each), while
    # stopping the local Ray this driver started stops every replica with it.
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_app(serve_port, smoke_library) -> str:
    """The smoke library served once, as app "main" under "/", for every module that needs it
    as written (test_http; test_remote's upstream): one app start instead of one a module. Its
    router is held at one replica: test_http's batching test reads the router's stats(), which
    count only the replica that answers. Returns the app's base URL."""
    from ray import serve

    from serve_app.app import build_app

    raw = yaml.safe_load(smoke_library.read_text())
    raw["router"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    path = smoke_library.with_name("library-one-router.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    serve.run(build_app({"library": str(path)}), name="main", route_prefix="/")
    return f"http://127.0.0.1:{serve_port}"


def client(port: int, prefix: str = "") -> httpx.Client:
    """An HTTP client for an app served under `prefix`; cold starts can take a while."""
    return httpx.Client(base_url=f"http://127.0.0.1:{port}{prefix}", timeout=120)


def wait_for(condition: Callable[[], Any], deadline_s: float, what: str) -> None:
    """Poll `condition` until it is true; fail naming `what` after `deadline_s` seconds."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.1)


def warm(experts: dict[str, Iterable[str]]) -> None:
    """Start the replicas of `experts` ({app: expert names}) all at once and wait for them, so
    a module whose tests are about answers pays its cold starts together, not one a test
    (test_cold_start.py is where requests at zero replicas are tested)."""
    from ray import serve

    calls = [
        serve.get_deployment_handle(name, app_name=app).score.remote("warm")
        for app, names in experts.items()
        for name in names
    ]
    for call in calls:
        call.result()


def undeploy(*apps: str) -> None:
    """Delete apps without waiting for their replicas to stop: Serve gives each replica 2 s to
    drain requests that no test sends any more, which the next module need not wait for."""
    from ray import serve

    for app in apps:
        serve.delete(app, _blocking=False)


def with_autoscaling(library: Path, **fields: Any) -> Path:
    """A copy of `library` (next to it, so paths still resolve) whose experts autoscale with
    `fields` merged over their own settings; tests use short delays."""
    raw = yaml.safe_load(library.read_text())
    for expert in raw["experts"]:
        expert["autoscaling"] = {**expert.get("autoscaling", {}), **fields}
    out = library.with_name("library-fast-autoscaling.yaml")
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out
