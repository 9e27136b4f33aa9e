"""Property-based fuzzing of the served API: schemathesis generates requests from the live
`/openapi.json` (inputs that fit the schema and inputs that do not); no answer may be a 5xx
(bad input is a 4xx, never a 5xx) and every 4xx is in the one error shape.

Random names are almost never an expert's or a weight's, so most generated requests would stop
at the first check (404, 400). Half the schema-valid ones are steered: real expert and weight
names, token counts up to the cap, a few hostile prompt endings, so that the generated values
(huge or tiny numbers, odd text) reach routing and generation.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from ray import serve
from schemathesis import GenerationMode

from serve_app.app import build_app
from serve_app.config import WEIGHT_NAMES, load_library
from tests.integration.conftest import ROOT, undeploy

APP, PREFIX = "fuzz", "/fuzz"
#: Examples per operation and generation mode: bounded, so the run takes about a minute.
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}
#: Seconds one request may take: a cold start of an expert included.
REQUEST_TIMEOUT_S = 120
ERROR_KEYS = {"message", "type", "param", "code"}
#: Token-count fields a steered request draws up to the ingress's cap (512).
TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
MAX_NEW_TOKENS = 512
#: Prompt endings that have broken text handling before: a lone surrogate, flag markers (one
#: that asks for an untrusted expert, one left open), a mask.
PROMPT_ENDINGS = ["", "\ud800", " [flag: security=0]", " [flag: smallest", " [MASK]"]
RESULTS = ROOT / "bench" / "results" / "fuzz.json"


@pytest.fixture(scope="module")
def base_url(serve_port, smoke_library) -> str:
    serve.run(build_app({"library": str(smoke_library)}), name=APP, route_prefix=PREFIX)
    yield f"http://127.0.0.1:{serve_port}{PREFIX}"
    undeploy(APP)


def error_shape_problem(body: bytes) -> str | None:
    """What is wrong with a 4xx body, or None when it is `{"error": {message, type, ...}}`."""
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return "not JSON of the shape {'error': {...}}"
    if not isinstance(err, dict) or set(err) != ERROR_KEYS:
        return f"error keys {sorted(err) if isinstance(err, dict) else err!r}"
    if not isinstance(err["message"], str) or not err["message"]:
        return "no message"
    if not isinstance(err["type"], str) or not err["type"]:
        return "no type"
    return None


def steer(body: dict, draw, experts: list[str]) -> None:
    """Swap real names into a generated body (in place), keeping its generated values."""
    for options in (body, body.get("tryage")):
        if not isinstance(options, dict):
            continue
        if isinstance(options.get("experts"), list):
            options["experts"] = draw(st.lists(st.sampled_from(experts), min_size=1, unique=True))
        if isinstance(options.get("weights"), dict):
            values = list(options["weights"].values())
            names = draw(st.permutations(WEIGHT_NAMES))
            options["weights"] = dict(zip(names, values, strict=False))
    if "model" in body:
        body["model"] = draw(st.sampled_from(["tryage", *experts]))
    for field in TOKEN_FIELDS:
        if isinstance(body.get(field), int):
            body[field] = draw(st.integers(1, MAX_NEW_TOKENS))
    ending = draw(st.sampled_from(PROMPT_ENDINGS))
    if isinstance(body.get("prompt"), str):
        body["prompt"] += ending
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        messages[-1]["content"] = str(messages[-1].get("content", "")) + ending


def fuzz_operation(
    operation, mode: GenerationMode, base_url: str, experts: list[str], session, seen: dict
) -> None:
    """Send EXAMPLES[mode] generated requests to one operation; record every answer in `seen`
    (the test asserts afterwards, so one bad answer does not hide the others)."""

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        derandomize=True,  # the same requests every run
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: nothing raises in here
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case, data):
        label = f"{case.method} {case.path}"
        if mode.is_positive and isinstance(case.body, dict) and data.draw(st.booleans()):
            steer(case.body, data.draw, experts)
            seen["steered"] += 1
        try:
            response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as err:
            seen["no_answer"].append(
                {"operation": label, "body": repr(case.body), "error": repr(err)}
            )
            return
        status = response.status_code
        seen["statuses"][status] += 1
        seen["by_operation"][label][status] += 1
        seen["requests"] += 1
        sent = response.request.body
        body = sent.decode("utf-8", "replace") if isinstance(sent, bytes) else sent
        if status >= 500:
            seen["5xx"].append(
                {"operation": label, "status": status, "body": body, "answer": response.text[:300]}
            )
        elif status >= 400 and (problem := error_shape_problem(response.content)):
            seen["bad_4xx"].append(
                {"operation": label, "status": status, "body": body, "problem": problem}
            )

    try:
        run()
    except Unsatisfiable:
        # Nothing to break in an operation without parameters or body (GET /healthz).
        seen["unsatisfiable"].append(f"{mode} {operation.method.upper()} {operation.path}")


@pytest.mark.slow  # hundreds of generated requests: about 30 s on 2 CPUs (-m slow)
def test_no_generated_request_gets_a_5xx(base_url, smoke_library):
    experts = load_library(smoke_library).names
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json").include(
        method=["GET", "POST"]
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    seen = {
        "requests": 0,
        "steered": 0,
        "statuses": Counter(),
        "by_operation": {f"{op.method.upper()} {op.path}": Counter() for op in operations},
        "5xx": [],
        "bad_4xx": [],
        "no_answer": [],
        "unsatisfiable": [],
    }
    with requests.Session() as session:
        for operation in operations:
            for mode in EXAMPLES:
                fuzz_operation(operation, mode, base_url, experts, session, seen)

    summary = {
        "operations": len(operations),
        "examples_per_operation": {str(mode): n for mode, n in EXAMPLES.items()},
        "requests": seen["requests"],
        "steered": seen["steered"],
        "statuses": {str(s): n for s, n in sorted(seen["statuses"].items())},
        "by_operation": {
            op: {str(s): n for s, n in sorted(c.items())} for op, c in seen["by_operation"].items()
        },
        "5xx": seen["5xx"],
        "bad_4xx": seen["bad_4xx"],
        "no_answer": seen["no_answer"],
        "not_generated": seen["unsatisfiable"],
    }
    print(f"\nschemathesis fuzz: {json.dumps(summary, indent=1, ensure_ascii=True)}")
    if os.environ.get("TRYAGE_WRITE_RESULTS") == "1":
        write_results(summary, RESULTS)

    assert len(operations) >= 5, [f"{op.method} {op.path}" for op in operations]
    assert seen["requests"] >= len(operations) * sum(EXAMPLES.values()) // 2
    assert not seen["no_answer"], seen["no_answer"][:5]
    assert not seen["5xx"], f"{len(seen['5xx'])} answers were 5xx: {seen['5xx'][:5]}"
    assert not seen["bad_4xx"], seen["bad_4xx"][:5]


def write_results(summary: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=True) + "\n")
