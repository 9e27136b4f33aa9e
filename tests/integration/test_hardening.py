"""Hostile and careless clients against a smoke library served with API keys and the
operator's policy `trusted_only`: every client error is a 4xx, one bad request costs no other
request its answer, and the service keeps serving."""

from __future__ import annotations

import concurrent.futures as futures
import json
import shutil
import time

import httpx
import pytest
import yaml
from ray import serve

from serve_app.app import build_app
from tests.integration.conftest import client, undeploy, warm

KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: A chat template of the kind real models ship (Gemma's refuses a system role): it raises for
#: one request and renders every other.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
)


@pytest.fixture(scope="module")
def guarded(serve_port, smoke_library, tmp_path_factory, monkeypatch_module):
    """The smoke library with `policy: {trusted_only: true}`, gen-m given a chat template,
    served with TRYAGE_API_KEYS set in the environment of the process that builds the app."""
    folder = tmp_path_factory.mktemp("guarded")
    shutil.copytree(smoke_library.parent, folder, dirs_exist_ok=True)
    raw = yaml.safe_load((folder / "library.yaml").read_text())
    raw["policy"] = {"trusted_only": True}
    raw["ingress"] = {"list_tryage": True}
    (folder / "library.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    tok = folder / "experts" / "gen-m" / "tokenizer_config.json"
    tok.write_text(json.dumps({**json.loads(tok.read_text()), "chat_template": TEMPLATE}))
    monkeypatch_module.setenv("TRYAGE_API_KEYS", f"other-key,{KEY}")
    app = build_app({"library": str(folder / "library.yaml")})
    serve.run(app, name="guarded", route_prefix="/guarded")
    warm({"guarded": ("gen-xs", "gen-m")})  # the generators its tests call
    with client(serve_port, "/guarded") as c:
        yield c
    undeploy("guarded")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_tryage_is_listed_first_where_the_operator_asks_with_what_it_routes_among(guarded):
    # ingress.list_tryage: chat UIs offer only listed models. Under trusted_only, tryage routes
    # among the trusted text-generation experts: not gen-s (untrusted), not mask-s (fill-mask).
    listed = guarded.get("/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in listed] == ["tryage", "gen-xs", "gen-s", "gen-m", "mask-s"]
    assert listed[0]["experts"] == ["gen-xs", "gen-m"]
    assert guarded.get("/v1/models/tryage", headers=AUTH).json() == listed[0]


def test_without_a_key_every_endpoint_but_healthz_is_401(guarded):
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/healthz").json() == {"status": "ok"}
    for r in (
        guarded.get("/v1/models"),
        guarded.post("/v1/route", json={"prompt": "hi"}),
        guarded.post("/v1/route", json={"prompt": "hi"}, headers={"Authorization": "Bearer x"}),
        guarded.get("/openapi.json"),
    ):
        assert _error(r, 401)["type"] == "authentication_error"
    assert guarded.get("/v1/models", headers=AUTH).status_code == 200


@pytest.mark.parametrize("max_tokens", [300, 500])
def test_max_tokens_near_the_cap_on_every_generator_is_200_or_4xx(guarded, max_tokens):
    for model in ("gen-xs", "gen-s", "gen-m"):
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens}
        r = guarded.post("/v1/completions", json=body, headers=AUTH)
        if model == "gen-s":  # untrusted: the policy bars it, whatever the request says
            assert "untrusted" in _error(r, 400)["message"]
            continue
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["total_tokens"] <= 256  # the smoke experts' context
        r = guarded.post(
            "/v1/infer",
            json={"prompt": "Once upon a time", "experts": [model], "max_new_tokens": max_tokens},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        assert r.json()["clamped"] is True and r.json()["max_new_tokens"] < 256


def test_sixteen_good_requests_batched_with_a_poisoned_one_are_all_answered(guarded):
    def chat(messages: list[dict]) -> httpx.Response:
        body = {"model": "gen-m", "messages": messages, "max_tokens": 4}
        return guarded.post("/v1/chat/completions", json=body, headers=AUTH)

    good = [[{"role": "user", "content": f"Tell me about number {i}"}] for i in range(16)]
    poison = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]
    with futures.ThreadPoolExecutor(17) as pool:
        answers = list(pool.map(chat, [*good[:8], poison, *good[8:]]))
    poisoned = answers.pop(8)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert all(r.headers["x-tryage-expert"] == "gen-m" for r in answers)
    assert "System role not supported" in _error(poisoned, 400)["message"]


def test_a_20_mb_body_is_refused_in_well_under_a_second(guarded):
    body = b'{"prompt": "' + b"x" * (20 << 20) + b'"}'
    start = time.perf_counter()
    r = guarded.post(
        "/v1/route", content=body, headers={**AUTH, "content-type": "application/json"}
    )
    took = time.perf_counter() - start
    assert _error(r, 413)["code"] == "body_too_large"
    assert took < 1.0, took


def test_200000_chat_messages_get_a_4xx(guarded):
    messages = [{"role": "user", "content": ""}] * 200_000
    r = guarded.post("/v1/chat/completions", json={"messages": messages}, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text


def test_weights_of_1e308_get_a_4xx_not_a_5xx(guarded):
    r = guarded.post("/v1/route", json={"prompt": "hi", "weights": {"size": 1e308}}, headers=AUTH)
    assert _error(r, 400)["param"] == "weights"


def test_35k_characters_of_unclosed_flags_answer_within_2_seconds(guarded):
    start = time.perf_counter()
    r = guarded.post("/v1/route", json={"prompt": "[flag:" * 5834}, headers=AUTH)
    assert time.perf_counter() - start < 2.0
    assert r.status_code in (200, 400), r.text


def test_a_lone_surrogate_is_a_400_and_the_message_can_be_encoded(guarded):
    body = b'{"prompt": "hi \\ud800 there"}'
    r = guarded.post(
        "/v1/route", content=body, headers={**AUTH, "content-type": "application/json"}
    )
    error = _error(r, 400)
    assert "surrogate" in error["message"] and error["param"] == "prompt"


def test_neither_flags_nor_weights_rank_an_untrusted_expert_under_trusted_only(guarded):
    for body in (
        {"prompt": "[flag: security=0] Once upon a time"},
        {"prompt": "Once upon a time", "weights": {"security": 0, "size": 100}},
        {"prompt": "[flag: smallest] hi", "weights": {"security": 0}},
    ):
        r = guarded.post("/v1/route", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        ranked = [x["expert"] for x in r.json()["ranking"]]
        assert "gen-s" not in ranked and ranked  # gen-s is the untrusted one


def test_answers_say_who_answered_and_that_it_was_no_fallback(guarded):
    r = guarded.post("/v1/infer", json={"prompt": "hello", "max_new_tokens": 2}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["x-tryage-expert"] == r.json()["expert"]
    assert r.headers["x-tryage-fallback"] == "false" and r.json()["fallback"] is False


def test_the_service_still_serves(guarded):
    r = guarded.post("/v1/route", json={"prompt": "still there?"}, headers=AUTH)
    assert r.status_code == 200, r.text


def test_the_load_test_checks_the_service_and_its_key_before_loading_it(guarded):
    # Minutes of load against a wrong host or without the key used to end in a traceback.
    from loadtest.run import ServiceError, check_service

    host = str(guarded.base_url).rstrip("/")
    check_service(host, KEY)
    with pytest.raises(ServiceError, match="an API key is needed; pass --api-key"):
        check_service(host, None)
    with pytest.raises(ServiceError, match="an API key is wrong"):
        check_service(host, "not-the-key")
    with pytest.raises(ServiceError, match="does not answer"):
        check_service("http://127.0.0.1:9", KEY, timeout_s=5)
