"""A library mixing local experts and a remote one (`engine: openai`): the remote expert is a
second tryage app on the same Serve (the session's smoke app, conftest.smoke_app), a real
OpenAI-compatible HTTP server that the mixed app reaches over HTTP like any other."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
import yaml
from ray import serve

from serve_app.app import build_app
from serve_app.router import HeadConfig, RouterHead, read_head_config, save_head
from tests.integration.conftest import client, undeploy, warm


@pytest.fixture(scope="module")
def mixed(serve_port, smoke_app, smoke_library, tmp_path_factory) -> httpx.Client:
    # The upstream: the session's smoke app ("main", under /).
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copytree(smoke_library.parent, folder, dirs_exist_ok=True)
    raw = yaml.safe_load((folder / "library.yaml").read_text())
    raw["experts"].append(
        {
            "name": "remote-m",
            "engine": "openai",
            "base_url": f"{smoke_app}/v1",
            "model": "gen-m",
            "task": "text-generation",
            "params": 500_000,
            "released": "2025-06-01",
            "trusted": True,
            "description": "gen-m, served by another tryage over OpenAI's API.",
            "price": {"input_per_mtok": 0.5, "output_per_mtok": 1.5},
        }
    )
    (folder / "library.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    # The router predicts every expert: a (random) head over the five.
    cfg = read_head_config(folder / "router")
    names = [*cfg.experts, "remote-m"]
    head = RouterHead(HeadConfig(experts=names, target_mean=[cfg.target_mean[0]] * len(names)))
    save_head(head, folder / "router")
    serve.run(
        build_app({"library": str(folder / "library.yaml")}), name="mixed", route_prefix="/mixed"
    )
    # gen-m here and behind remote-m (the tests' generators), started together.
    warm({"mixed": ["gen-m"], "main": ["gen-m"]})
    with client(serve_port, "/mixed") as c:
        yield c
    undeploy("mixed")


def test_the_remote_expert_is_listed_with_its_price(mixed):
    models = {m["id"]: m for m in mixed.get("/v1/models").json()["data"]}
    assert {"gen-xs", "gen-m", "remote-m"} <= set(models)
    assert models["remote-m"]["price"] == {"input_per_mtok": 0.5, "output_per_mtok": 1.5}


def test_local_and_remote_experts_both_answer(mixed):
    local = mixed.post(
        "/v1/infer", json={"prompt": "Once upon", "experts": ["gen-m"], "max_new_tokens": 4}
    )
    remote = mixed.post(
        "/v1/infer", json={"prompt": "Once upon", "experts": ["remote-m"], "max_new_tokens": 4}
    )
    assert local.status_code == 200 and remote.status_code == 200, (local.text, remote.text)
    assert remote.json()["expert"] == "remote-m"
    # The remote is the same model, greedy: the same words as the local expert.
    assert remote.json()["output"] == local.json()["output"]
    # Stop strings reach the remote server, which ends the answer before them.
    text = local.json()["output"]
    stop = {"stop": [text[2:4]], "max_new_tokens": 4, "prompt": "Once upon"}
    remote = mixed.post("/v1/infer", json={"experts": ["remote-m"], **stop})
    assert remote.json()["output"] == text[: text.find(text[2:4])], remote.text


def test_a_remote_expert_streams_through_the_openai_client(mixed, serve_port):
    oai = openai.OpenAI(
        base_url=f"http://127.0.0.1:{serve_port}/mixed/v1", api_key="unused", max_retries=0
    )
    stream = oai.chat.completions.create(
        model="remote-m", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {"remote-m"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens > 0


def test_the_cost_weight_moves_routing_off_the_priced_expert(mixed):
    body = {"prompt": "hi", "experts": ["gen-m", "remote-m"], "weights": {"cost": 1000}}
    r = mixed.post("/v1/route", json=body)
    assert r.status_code == 200, r.text
    ranking = {x["expert"]: x for x in r.json()["ranking"]}
    assert r.json()["expert"] == "gen-m"
    assert ranking["remote-m"]["penalties"] == {"cost": 1000.0}
    assert ranking["gen-m"]["penalties"] == {"cost": 0.0}


def test_imported_scores_route_among_remote_experts(mixed, serve_port, smoke_app, tmp_path):
    """Remote experts profiled by imported scores (no model runs here): the router learns
    from the scores which remote expert is good at what, and the service routes to it."""
    import json

    from serve_app.config import load_library
    from serve_app.learn.profile import read_profile
    from serve_app.learn.scores import import_scores
    from serve_app.learn.train import TrainConfig, train

    code = [f"def f{i}(x):\n    return x * {i} + {i + 1}" for i in range(24)]
    prose = [
        f"The weather on day {i} was mild, and the walk by the river was pleasant."
        for i in range(24)
    ]
    rows = [
        {"text": t, "model": m, "score": float((m == "gen-s") == (t in code)), "domain": d}
        for d, texts in (("code", code), ("prose", prose))
        for t in texts
        for m in ("gen-s", "gen-m")
    ]
    scores = tmp_path / "evals.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = import_scores("jsonl", [scores], tmp_path / "lib", base_url=f"{smoke_app}/v1")
    library = load_library(result.library, router=False)
    train(
        library, read_profile(result.profile), library.router.checkpoint, TrainConfig(max_epochs=30)
    )
    serve.run(
        build_app({"library": str(result.library)}), name="imported", route_prefix="/imported"
    )
    try:
        with client(serve_port, "/imported") as c:
            assert (
                c.post("/v1/route", json={"prompt": "def g(y):\n    return y - 1"}).json()["expert"]
                == "gen-s"
            )
            r = c.post(
                "/v1/infer",
                json={"prompt": "It was a mild day by the river, and", "max_new_tokens": 4},
            )
            assert r.status_code == 200, r.text
            assert r.json()["expert"] == "gen-m" and r.json()["output"]
    finally:
        undeploy("imported")
