"""build_app only wires: one deployment per expert, named after it, with the library's options."""

from __future__ import annotations

import json

import pytest
import yaml

from serve_app.api import key_digest
from serve_app.app import build_app
from serve_app.config import EXPERT_AUTOSCALING_DEFAULTS, LibraryError, load_library


def _graph(app):
    ingress = app._bound_deployment
    _, router, experts = ingress.init_args
    return ingress, router._bound_deployment, {n: a._bound_deployment for n, a in experts.items()}


def test_every_expert_gets_a_deployment_named_after_it(smoke_library):
    ingress, router, experts = _graph(build_app({"library": str(smoke_library)}))
    library = load_library(smoke_library)
    assert ingress.name == "Ingress"
    assert router.name == "Router"
    assert list(experts) == library.names
    assert [d.name for d in experts.values()] == library.names


def test_api_keys_reach_the_ingress_as_digests_only(smoke_library, monkeypatch):
    # Serve's REST API (GET /api/serve/applications/) shows every deployment's
    # ray_actor_options, runtime environment included: the keys must not be there.
    monkeypatch.setenv("TRYAGE_API_KEYS", "sk-first, sk-second")
    ingress, _, _ = _graph(build_app({"library": str(smoke_library)}))
    options = json.dumps(ingress.ray_actor_options)
    assert "sk-first" not in options and "sk-second" not in options
    env_vars = ingress.ray_actor_options["runtime_env"]["env_vars"]
    digests = f"{key_digest('sk-first')},{key_digest('sk-second')}"
    assert env_vars == {"TRYAGE_API_KEY_DIGESTS": digests}


def test_library_options_reach_serve(smoke_library, tmp_path):
    raw = yaml.safe_load(smoke_library.read_text())
    raw["router"]["resources"] = {"num_gpus": 1}
    raw["router"]["batching"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.2}
    raw["experts"][0]["resources"] = {"num_gpus": 0.5, "memory": 1_000_000}
    raw["experts"][0]["autoscaling"] = {"max_replicas": 7}
    raw["experts"][0]["max_ongoing_requests"] = 3
    path = smoke_library.parent / "options.yaml"
    path.write_text(yaml.safe_dump(raw))

    _, router, experts = _graph(build_app({"library": str(path)}))
    assert router.ray_actor_options["num_gpus"] == 1
    assert router.user_config == {"max_batch_size": 4, "batch_wait_timeout_s": 0.2}
    first, second = list(experts.values())[:2]
    assert first.ray_actor_options["num_gpus"] == 0.5
    assert first.ray_actor_options["memory"] == 1_000_000
    assert first.max_ongoing_requests == 3
    scaling = first._deployment_config.autoscaling_config
    assert scaling.max_replicas == 7
    assert scaling.min_replicas == 0  # the scale-to-zero default stays
    # An expert that says nothing gets the defaults.
    defaults = second._deployment_config.autoscaling_config
    assert defaults.min_replicas == EXPERT_AUTOSCALING_DEFAULTS["min_replicas"] == 0
    assert defaults.max_replicas == EXPERT_AUTOSCALING_DEFAULTS["max_replicas"]


def test_build_app_validates_its_arguments(smoke_library):
    with pytest.raises(ValueError, match="colour"):
        build_app({"library": str(smoke_library), "colour": "red"})
    with pytest.raises(LibraryError, match="does not exist"):
        build_app({"library": str(smoke_library.parent / "missing.yaml")})


def test_the_driver_ingress_and_remote_experts_import_no_torch(smoke_library):
    # None of them holds a model. The ingress and remote experts' replicas would carry about
    # 180 MB more and start more slowly with torch; the driver of `tryage serve` and `serve run`
    # binds the graph, and the real loaders (serve_app.loaders) import torch only in the router's
    # and experts' replicas; a library's parameter counts come from safetensors headers alone.
    import subprocess
    import sys

    loaded = "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    build = f"build_app({{'library': {str(smoke_library)!r}}})"
    code = (
        f"import sys, deployments.ingress, deployments.remote; {loaded}; "
        f"from serve_app.app import build_app; {build}; {loaded}"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"], out.stdout + out.stderr
