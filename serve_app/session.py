"""Ray and Serve sessions: the one place that starts Ray, starts Serve and serves a library.

The CLI, the demo build, the benchmarks, the load test and the tests all come through here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: The checkout: Ray workers import `deployments/` and `serve_app/` from it.
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on the loopback that nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on: platform, Python, CPUs, torch, Ray, device, load average."""
    import ray
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_average_1m": os.getloadavg()[0],
    }


def workers_import_checkout() -> None:
    """Ray workers do not get the driver's sys.path: let them import this checkout's code."""
    parts = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))


@contextlib.contextmanager
def ray_session(**init: Any) -> Iterator[None]:
    """Use the Ray already running (or RAY_ADDRESS's cluster, or start a local one) for a job;
    shut down only what this started. `init` goes to `ray.init`."""
    import ray

    started = not ray.is_initialized()
    if started:
        init.setdefault("log_to_driver", False)
        ray.init(**init)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class _Reconnect(logging.Filter):
    """Drops Serve's `Connecting to existing Serve app ... New http_options/controller_options
    will not be applied`, which `serve.run` logs on the Serve that `serve.start` has just
    started with our host and port: they were applied, and the line says otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Connecting to existing Serve app" not in record.getMessage()


@contextlib.contextmanager
def _quiet_reconnect() -> Iterator[None]:
    log = logging.getLogger("ray.serve")
    quiet = _Reconnect()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


@contextlib.contextmanager
def serving(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    name: str = "tryage",
    on_start: Callable[[], None] | None = None,
    **init: Any,
) -> Iterator[str]:
    """Serve a Serve application on `host:port` (a free port when None) inside a Ray session;
    yields the base URL and shuts Serve down (and Ray, if this started it) on the way out.
    `on_start` runs once Ray and Serve are up, before the application starts (which waits
    for every deployment that must be running)."""
    from ray import serve

    workers_import_checkout()
    port = port or free_port()
    with ray_session(**init):
        try:
            serve.start(http_options={"host": host, "port": port})
            if on_start is not None:
                on_start()
            with _quiet_reconnect():
                serve.run(app, name=name, route_prefix="/")
            yield f"http://{host}:{port}"
        finally:
            serve.shutdown()
