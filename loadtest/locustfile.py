"""Locust users and load shape for tryage: `locust -f loadtest/locustfile.py --headless`.

Run from the repository root with it on PYTHONPATH (the runner, `python -m loadtest`, does):

    PYTHONPATH=. locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000

Settings come from the environment (the runner sets them): TRYAGE_LOADTEST_PROFILE (short or
long), TRYAGE_LOADTEST_USERS (peak users, default the profile's), TRYAGE_LOADTEST_DATA (a
data path; default ../shared/corpora or the standard-library corpus), TRYAGE_LOADTEST_SEED.
The load logic lives in loadtest/shape.py and loadtest/prompts.py, which do not import Locust.
"""

import os
import random
import threading
import time

from locust import HttpUser, LoadTestShape, between, events, task

from loadtest import prompts, shape
from loadtest.report import LOAD_START

_shared: dict = {}
_lock = threading.Lock()
_log_lock = threading.Lock()


def _stages() -> list[shape.Stage]:
    stages = shape.PROFILES[os.environ.get("TRYAGE_LOADTEST_PROFILE", "short")]
    peak = os.environ.get("TRYAGE_LOADTEST_USERS")
    return shape.scaled(stages, int(peak)) if peak else stages


@events.request.add_listener
def _log_request(request_type, name, response_time, exception, start_time=None, **_):
    """Every request's start, name, latency and outcome, to TRYAGE_LOADTEST_OUT/requests.csv
    (the report's per-phase percentiles)."""
    log = _shared.get("log")
    if log is None:
        return
    failed = int(exception is not None)
    line = f"{start_time or 0:.3f},{name.replace(',', ' ')},{response_time:.1f},{failed}\n"
    with _log_lock:  # not _lock: on_start holds that while its request fires this event
        log.write(line)


@events.test_start.add_listener
def _open_log(environment, **_):
    out = os.environ.get("TRYAGE_LOADTEST_OUT")
    if out:
        _shared["log"] = open(os.path.join(out, "requests.csv"), "w", buffering=1)  # noqa: SIM115
        _shared["log"].write("start,name,response_ms,failed\n")


@events.test_stop.add_listener
def _close_log(environment, **_):
    log = _shared.pop("log", None)
    if log is not None:
        log.close()


@events.test_start.add_listener
def _load_prompts(environment, **_):
    """Read the prompts once per Locust process, before any user starts."""
    data = os.environ.get("TRYAGE_LOADTEST_DATA") or prompts.default_data_path()
    seed = int(os.environ.get("TRYAGE_LOADTEST_SEED", "0"))
    _shared["prompts"] = prompts.sample_prompts(data, seed=seed)


class TryageUser(HttpUser):
    """A client that sends the request mix, one request at a time, with think time."""

    wait_time = between(0.5, 1.5)

    def on_start(self):
        key = os.environ.get("TRYAGE_LOADTEST_API_KEY")
        if key:  # a service with TRYAGE_API_KEYS set
            self.client.headers["Authorization"] = f"Bearer {key}"
        seed = int(os.environ.get("TRYAGE_LOADTEST_SEED", "0"))
        with _lock:
            _shared["users"] = _shared.get("users", 0) + 1
            self.rng = random.Random(seed * 100_003 + _shared["users"])
            if "experts" not in _shared:
                answer = self.client.get("/v1/models", name="/v1/models", timeout=60)
                answer.raise_for_status()
                _shared["experts"] = prompts.experts_from_models(answer.json())
        self.experts = _shared["experts"]

    @task
    def send(self):
        spec = prompts.make_request(self.rng, self.rng.choice(_shared["prompts"]), self.experts)
        with self.client.post(
            spec.path, json=spec.body, name=spec.name, timeout=180, catch_response=True
        ) as answer:
            result = prompts.outcome(answer.status_code, answer.headers, _json(answer))
            if result == "rejected":
                # Backpressure by design: its own name, not a failure.
                answer.request_meta["name"] = spec.name + prompts.REJECTED
                answer.success()
            elif result == "failure":
                answer.failure(f"HTTP {answer.status_code}: {answer.text[:200]}")
            else:
                if spec.path == "/v1/infer" and prompts.rerouted(_json(answer)):
                    # Answered, by a lower-ranked expert: the ones above were busy or failed.
                    answer.request_meta["name"] = spec.name + prompts.REROUTED
                answer.success()


def _json(answer) -> object:
    try:
        return answer.json()
    except ValueError:
        return None


class StagesShape(LoadTestShape):
    """Ramp up, hold, ramp down, idle: the stages of loadtest/shape.py."""

    def __init__(self):
        super().__init__()
        self.stages = _stages()

    def tick(self):
        run_time = self.get_run_time()
        out = os.environ.get("TRYAGE_LOADTEST_OUT")
        if out and "started" not in _shared:
            # The shape's t = 0 in Unix seconds: the report counts its stages from here.
            _shared["started"] = time.time() - run_time
            with open(os.path.join(out, LOAD_START), "w") as f:
                f.write(f"{_shared['started']:.3f}\n")
        return shape.tick(self.stages, run_time)
