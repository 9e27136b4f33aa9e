"""The load test as a user runs it: Locust reads our locustfile, and (slow) the whole short
profile against a library it serves itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT


def test_locust_reads_the_locustfile():
    """`locust -f loadtest/locustfile.py --list` finds our user (and so imports cleanly)."""
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--list"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TryageUser" in done.stdout


@pytest.mark.slow
def test_short_load_test_scales_experts_up_and_back_to_zero(smoke_library, tmp_path):
    """`python -m loadtest --profile short`: no failures, experts up under load and down after."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "--profile",
            "short",
            "--library",
            str(smoke_library),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failures"] == 0
    assert report["requests"] > 100
    experts = ["gen-xs", "gen-s", "gen-m", "mask-s"]
    for name in experts:
        assert report["replicas"][name]["max"] >= 1, report
        assert report["replicas"][name]["final"] == 0, report
        assert report["scale_down_s"][name] is not None, report
    for name in ("locust_stats.csv", "replicas.csv", "report.md", "report.png"):
        assert (tmp_path / name).is_file()
    # The phases count from the shape's start, so every request is in one of them.
    assert (tmp_path / "load_start.txt").is_file()
    logged = len((tmp_path / "requests.csv").read_text().splitlines()) - 1
    assert sum(p["requests"] for p in report["phases"]) == logged
