"""The README's commands, run as a user runs them: `tryage smoke-library`, `tryage serve`,
and Ray's own `serve run serve_app.app:build_app library=FILE`. Each starts its own Ray."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from loadtest.observer import rest_source
from serve_app.demo.build import machine_cpus
from tests.integration.conftest import ROOT, free_port

BIN = Path(sys.executable).parent
EXPERTS = ["gen-xs", "gen-s", "gen-m", "mask-s"]  # the smoke library's, in its order


def wait_healthy(proc: subprocess.Popen, url: str, deadline_s: float = 240) -> None:
    """Poll /healthz until it answers 200; fail early if the server process dies."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{output(proc)[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{url} did not become healthy in {deadline_s} s")


def stop(proc: subprocess.Popen) -> int:
    """Ctrl-C, as a user would; the process must exit on its own."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # with the Ray it started


def interrupt_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Ctrl-C to the process group, as a terminal sends it; then kill the group (with the
    Ray it started) if it has not exited within `grace_s`."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start(
    args: list[str], log: Path, env: dict | None = None, stopped_after_test: bool = True
) -> subprocess.Popen:
    """Run a server with its output in `log`: a pipe nobody reads while it runs fills up
    (Serve logs a lot) and blocks the server, Ctrl-C handling included. Unless told, the
    test's teardown stops it if it is still running."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal gives a command
            env=env,
        )
    proc.log = log  # type: ignore[attr-defined]
    if stopped_after_test:
        STARTED.append(proc)
    return proc


#: Servers `start` started; each test's teardown stops any still running.
STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_server_left_running():
    """A test that fails before stopping its server must not leave it (and its Ray) running."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            interrupt_group(proc)


def output(proc: subprocess.Popen) -> str:
    """What a server started by `start` has printed so far."""
    return proc.log.read_text(errors="replace")  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def cli_library(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "s"
    done = subprocess.run(
        [BIN / "tryage", "smoke-library", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return out / "library.yaml"


def test_smoke_library_writes_a_valid_library(cli_library):
    raw = yaml.safe_load(cli_library.read_text())
    experts = raw["experts"]
    assert len(experts) >= 3
    assert len({e["released"] for e in experts}) == len(experts)
    assert (cli_library.parent / raw["router"]["checkpoint"] / "router.json").is_file()
    for e in experts:
        assert list((cli_library.parent / e["model"]).glob("*.safetensors"))


@pytest.fixture(scope="module")
def serve_run(cli_library, tmp_path_factory) -> Iterator[subprocess.Popen | None]:
    """Ray's own `serve run serve_app.app:build_app library=FILE`, with a Ray of its own;
    None where port 8000, where it always listens, is taken. The `tryage serve` test asks for
    it too, so the two servers start together: each spends most of its start waiting on Ray
    and Serve, not computing."""
    if not _port_free(8000):
        yield None
        return
    proc = start(
        [
            BIN / "serve",
            "run",
            "serve_app.app:build_app",
            f"library={cli_library}",
            "--name=tryage",
        ],
        tmp_path_factory.mktemp("serve-run") / "serve-run.log",
        stopped_after_test=False,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # How Ray's own CLI winds down is Ray's (in the full suite it has taken from 8 s to
            # over two minutes); tryage serve's clean stop is asserted in its own test. Nothing
            # is asserted here, so the process group (the server and the Ray it started) is
            # killed rather than waited for.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_tryage_serve_answers_exports_metrics_and_stops_on_ctrl_c(cli_library, serve_run, tmp_path):
    port, metrics_port = free_port(), free_port()
    cmd = [BIN / "tryage", "serve", "--library", str(cli_library), "--port", str(port)]
    cmd += ["--metrics-port", str(metrics_port)]
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}  # scrape sooner
    proc = start(cmd, tmp_path / "serve.log", env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    r = httpx.post(f"{url}/v1/route", json={"prompt": "hi [flag: smallest]"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["expert"] == "gen-xs"
    body = {"prompt": "Once upon", "max_new_tokens": 3, "experts": ["gen-s"]}
    assert httpx.post(f"{url}/v1/infer", json=body, timeout=120).status_code == 200
    assert httpx.post(f"{url}/v1/route", json={"prompt": ""}, timeout=60).status_code == 400
    # Prometheus text from Ray's metrics endpoint: tryage's counters labelled by expert.
    wanted = (
        'ray_tryage_requests_total{endpoint="/v1/route",expert="gen-xs"',
        'ray_tryage_requests_total{endpoint="/v1/infer",expert="gen-s"',
        'ray_tryage_tokens_total{direction="out",expert="gen-s"',
        'ray_tryage_rejections_total{endpoint="/v1/route",reason="invalid_request"',
        "ray_tryage_stage_seconds_bucket",
        "ray_tryage_predicted_loss_bucket",
        "ray_serve_num_http_requests_total",
    )
    # Every metric the Grafana dashboard in deploy/ queries must be one this service exports;
    # tryage's own count events, so one with none yet (no fallback here) is defined only.
    dashboard = (ROOT / "deploy" / "grafana" / "tryage-dashboard.json").read_text()
    queried = set(re.findall(r"\b(ray_[a-z_]+?)(?:_bucket|_sum|_count)?\b", dashboard))
    defined = re.findall(r'"(tryage_[a-z_]+)"', (ROOT / "serve_app" / "telemetry.py").read_text())
    end, text = time.monotonic() + 90, ""
    while time.monotonic() < end:  # Ray's agent exports each metric on its own schedule
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        flat = "\n".join(_sorted_labels(line) for line in text.splitlines())
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()}
        exported |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported}
        known = exported | {f"ray_{name}" for name in defined}
        if all(w in flat for w in wanted) and not queried - known:
            break
        time.sleep(1)
    missing = [w for w in wanted if w not in flat]
    assert not missing, f"missing from /metrics: {missing}"
    assert queried and not queried - known, f"dashboard queries unknown {queried - known}"
    assert "Prometheus metrics on" in output(proc)
    # The smoke library reserves 2 CPUs with its router at two replicas: it fits a Ray of 2
    # or more, and serving it on fewer warns that routed prompts may wait.
    assert ("tryage: warning:" in output(proc)) == (machine_cpus() < 2.0), output(proc)[-2000:]
    # The load test's cluster mode (`--host`) reads replicas from Serve's REST API on the
    # Ray dashboard that `tryage serve` starts.
    dashboard = re.search(r"View the dashboard at \S*?(http://[\w.]+:\d+)", output(proc))
    assert dashboard, output(proc)[-2000:]
    samples = rest_source(dashboard.group(1), "tryage")()
    assert {s.deployment for s in samples} == {"Ingress", "Router", *EXPERTS}, samples
    assert {s.deployment: s.running for s in samples}["Router"] >= 1
    assert stop(proc) == 0
    assert "tryage: stopping" in output(proc)
    # Serve's "New http_options ... will not be applied": they were (the port answered).
    assert "will not be applied" not in output(proc)


def _sorted_labels(line: str) -> str:
    """A Prometheus sample line with only its tryage labels, sorted by name (Ray adds its own
    labels: node, worker, replica...)."""
    name, brace, rest = line.partition("{")
    if not brace:
        return line
    labels, _, _ = rest.partition("}")
    keep = sorted(
        part
        for part in labels.split('",')
        if part.split("=")[0] in ("endpoint", "expert", "reason", "direction", "stage")
    )
    return name + "{" + ",".join(p if p.endswith('"') else p + '"' for p in keep)


def test_tryage_serve_refuses_a_bad_library(tmp_path):
    bad = tmp_path / "library.yaml"
    bad.write_text("router: {checkpoint: router}\nexperts: []\n")
    done = subprocess.run(
        [BIN / "tryage", "serve", "--library", str(bad)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "experts" in done.stderr and str(bad) in done.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_ray_serve_run_builds_the_app(serve_run):
    if serve_run is None:
        pytest.skip("`serve run` always listens on port 8000, which is taken here")
    url = "http://127.0.0.1:8000"
    wait_healthy(serve_run, url)
    r = httpx.get(f"{url}/v1/models", timeout=30)
    assert [m["id"] for m in r.json()["data"]] == EXPERTS
