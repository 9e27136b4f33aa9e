"""The deployment files: every YAML in the repo loads, cluster.yaml matches Ray's launcher schema,
serve_config.yaml is a Serve config, and the RayService carries the same Serve config."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]
#: Folders that hold no YAML of ours: environments, caches, built libraries, VCS data.
SKIP = {".venv", ".git", "libraries", "node_modules", ".pytest_cache", ".ruff_cache"}
LIBRARY_ON_NODES = "/home/ray/tryage/libraries/demo/library.yaml"


def repo_yaml() -> list[Path]:
    """YAML files of the repo: what git tracks or would track (not what it ignores), or every
    one outside SKIP when this is no git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        files = [ROOT / name for name in listed if name.endswith((".yaml", ".yml"))]
    except (OSError, subprocess.CalledProcessError):
        files = [*ROOT.rglob("*.yaml"), *ROOT.rglob("*.yml")]
    return sorted(p for p in files if p.is_file() and not SKIP & set(p.relative_to(ROOT).parts))


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load("cluster.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load("deploy/kuberay/rayservice.yaml")


def test_every_yaml_in_the_repo_loads():
    files = repo_yaml()
    names = {str(p.relative_to(ROOT)) for p in files}
    assert {"cluster.yaml", "serve_config.yaml", "deploy/kuberay/rayservice.yaml"} <= names
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(doc is not None for doc in docs), f"{path} is empty"


def test_cluster_yaml_matches_rays_launcher_schema(cluster):
    import jsonschema

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_cluster_yaml_passes_the_checks_ray_up_runs_first(cluster):
    # What `ray up` does with the file before it reaches the cloud: fill in the provider's
    # defaults, then check node types, worker counts and the Docker section (Ray's private API).
    from ray.autoscaler._private.docker import validate_docker_config
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))  # it fills in the dicts it is given
    validate_config(prepared)
    validate_docker_config(prepared)


def test_cluster_has_a_cpu_head_and_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    # One GPU node always up for the router (min_replicas 1); the rest come with experts.
    assert sum(t.get("min_workers", 0) for t in workers) >= 1
    assert "--num-gpus=0" in " ".join(cluster["head_start_ray_commands"])


@pytest.mark.parametrize("key", ["head_setup_commands", "worker_setup_commands"])
def test_cluster_installs_pinned_torch_before_the_project(cluster, key):
    commands = cluster[key]
    torch_at = next(i for i, c in enumerate(commands) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(commands) if "pip install -q -e ~/tryage" in c)
    assert torch_at < project_at


def test_cluster_copies_the_library_serve_config_names(cluster):
    mounts = cluster["file_mounts"]
    library_dir = str(Path(LIBRARY_ON_NODES).parent)
    assert library_dir in mounts
    assert mounts["/home/ray/tryage"] == "."
    app = ServeDeploySchema.model_validate(load("serve_config.yaml")).applications[0]
    assert app.args["library"] == LIBRARY_ON_NODES


def test_serve_config_builds_the_app_from_a_library():
    config = ServeDeploySchema.model_validate(load("serve_config.yaml"))
    (app,) = config.applications
    assert app.import_path == "serve_app.app:build_app"
    assert set(app.args) == {"library"}
    assert app.route_prefix == "/"
    assert config.http_options.port == 8000


def test_rayservice_carries_the_same_serve_config(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config == load("serve_config.yaml")


def test_deploy_files_agree_on_the_ray_version(cluster, rayservice):
    version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    images = [cluster["docker"]["head_image"], cluster["docker"]["worker_image"]]
    images += [line for line in (ROOT / "deploy/Dockerfile").read_text().splitlines()]
    images = [i for i in images if "rayproject/ray:" in i]
    assert len(images) == 3
    assert all(f"rayproject/ray:{version}-" in image for image in images), images


def test_rayservice_has_a_cpu_head_and_gpu_workers(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert sum(g["minReplicas"] for g in cluster["workerGroupSpecs"]) >= 1


# --- exposure: the dashboard runs code, the API is the only thing clients reach -------------


def test_cluster_dashboard_listens_on_the_heads_loopback_only(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start


def test_rayservice_exposes_only_the_serve_port_to_clients(rayservice):
    service = rayservice["spec"]["serveService"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [{"name": "serve", "port": 8000}]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["port"] == 8000


def test_rayservice_keeps_the_dashboard_inside_the_cluster_behind_a_token(rayservice):
    # KubeRay's operator deploys serveConfigV2 through the dashboard over the head Service, so
    # the dashboard cannot be on the head's loopback: token auth and an in-cluster Service only.
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "headService" not in head  # a custom head Service could change its type or ports
    (container,) = head["template"]["spec"]["containers"]
    serve_ports = [p for p in container["ports"] if p["containerPort"] == 8000]
    assert serve_ports == [{"containerPort": 8000, "name": "serve"}]


def test_deploy_files_say_how_to_reach_the_dashboard_and_protect_the_api():
    for name, tunnel in (
        ("cluster.yaml", "ray dashboard cluster.yaml"),
        ("deploy/kuberay/rayservice.yaml", "kubectl port-forward svc/tryage-head-svc 8265"),
    ):
        text = (ROOT / name).read_text()
        assert tunnel in text, name
        assert "TRYAGE_API_KEYS" in text, name
    assert "TRYAGE_API_KEYS" in (ROOT / "serve_config.yaml").read_text()
