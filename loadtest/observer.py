"""Samples every deployment's replica count over time into `replicas.csv`.

Two sources: `serve.status()` in the driver that serves the app (plus the controller's
details for the autoscaler's target), or Serve's REST API (`GET /api/serve/applications/` on
the Ray dashboard) for a remote cluster. One row per deployment per sample:
`time` (Unix seconds), `deployment`, `running` (replicas in the RUNNING state), `target` (the
autoscaler's target, empty where unknown) and `min_replicas` (empty where unknown).
"""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIELDS = ("time", "deployment", "running", "target", "min_replicas")


@dataclass(frozen=True)
class Sample:
    """One deployment's replicas at one moment."""

    deployment: str
    running: int
    target: int | None = None
    min_replicas: int | None = None


#: A source returns the current samples of every deployment of an application.
Source = Callable[[], list[Sample]]


def parse_serve_details(details: Mapping[str, Any], app: str) -> list[Sample]:
    """Samples from Serve's instance details (the REST API's JSON) for application `app`;
    none where it is not (yet) there."""
    apps = details.get("applications") or {}
    if app not in apps:
        return []
    out = []
    for name, dep in sorted((apps[app].get("deployments") or {}).items()):
        running = sum(1 for r in dep.get("replicas") or [] if r.get("state") == "RUNNING")
        config = dep.get("deployment_config") or {}
        scaling = config.get("autoscaling_config") or {}
        minimum = scaling.get("min_replicas", config.get("num_replicas"))
        out.append(Sample(name, running, dep.get("target_num_replicas"), minimum))
    return out


def local_source(app: str) -> Source:
    """Replica counts from `serve.status()`; targets from the controller where it answers."""

    def sample() -> list[Sample]:
        from ray import serve

        status = serve.status().applications.get(app)
        if status is None:
            return []
        extra = {s.deployment: s for s in _local_details(app)}
        out = []
        for name, dep in sorted(status.deployments.items()):
            running = int(dep.replica_states.get("RUNNING", 0))
            more = extra.get(name)
            out.append(Sample(name, running, more and more.target, more and more.min_replicas))
        return out

    return sample


def _local_details(app: str) -> list[Sample]:
    """The target and minimum from the Serve controller (the REST API's own data)."""
    try:
        from ray.serve.context import _get_global_client

        return parse_serve_details(_get_global_client().get_serve_details(), app)
    except Exception:  # a private API: without it the running count is still right
        return []


def ray_auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The bearer token for a Ray dashboard with token authentication (Ray turns it on for
    a local cluster by default), found where Ray looks for it, in its order: $RAY_AUTH_TOKEN,
    the file $RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token. No header where there is none."""
    env = os.environ if environ is None else environ
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = env.get("RAY_AUTH_TOKEN_PATH")
        file = Path(path) if path else Path.home() / ".ray" / "auth_token"
        token = file.read_text().strip() if path or file.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def rest_source(dashboard: str, app: str | None = None, timeout_s: float = 5.0) -> Source:
    """Replica counts from Serve's REST API on a Ray dashboard, e.g. http://head:8265, with
    Ray's auth token where one is found (ray_auth_headers). `app`: the Serve application;
    None: the cluster's only one (`serve run` names it "default", serve_config.yaml
    "tryage"), or "tryage" among several."""
    import httpx

    url = dashboard.rstrip("/") + "/api/serve/applications/"
    headers = ray_auth_headers()

    def details() -> Mapping[str, Any]:
        answer = httpx.get(url, timeout=timeout_s, headers=headers)
        if answer.status_code in (401, 403):
            raise PermissionError(
                f"{url} answered {answer.status_code}: the dashboard wants Ray's auth token; "
                "set RAY_AUTH_TOKEN to what `ray get-auth-token` prints on the head node"
            )
        answer.raise_for_status()
        return answer.json()

    if app is None:
        app = pick_app(details())

    def sample() -> list[Sample]:
        return parse_serve_details(details(), app)

    sample.app = app  # type: ignore[attr-defined]
    return sample


def pick_app(details: Mapping[str, Any]) -> str:
    """The application to observe when none is named: the only one, or "tryage"."""
    apps = sorted(details.get("applications") or {})
    if len(apps) == 1:
        return apps[0]
    if "tryage" in apps:
        return "tryage"
    raise ValueError(
        f"Serve runs {len(apps)} applications ({', '.join(apps) or 'none'}): name the one to "
        "observe with --app"
    )


class ReplicaObserver:
    """A thread that writes a row per deployment to `path` every `interval_s` seconds."""

    def __init__(self, source: Source, path: Path, interval_s: float = 1.0):
        self.source = source
        self.path = Path(path)
        self.interval_s = interval_s
        self.latest: list[Sample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-observer", daemon=True)

    def start(self) -> ReplicaObserver:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(FIELDS)
            while not self._stop.is_set():
                started = time.time()
                try:
                    samples = self.source()
                except Exception:  # a missed sample is a gap in the plot, not a failed run
                    self.errors += 1
                    samples = []
                for s in samples:
                    writer.writerow(
                        [
                            f"{started:.3f}",
                            s.deployment,
                            s.running,
                            _blank(s.target),
                            _blank(s.min_replicas),
                        ]
                    )
                f.flush()
                self.latest = samples
                self._stop.wait(max(0.0, self.interval_s - (time.time() - started)))


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)
