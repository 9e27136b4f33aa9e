"""Every library our code imports is one pyproject.toml asks for by name: a package that only
arrives as another's dependency can stop arriving (openai 3 dropped httpx for httpx2)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
OURS = {"serve_app", "deployments", "loadtest", "bench", "tests", "__future__"}
#: The code of each folder runs in an install of the project with these extras.
EXTRAS = {
    "serve_app": [],
    "deployments": [],
    "loadtest": ["loadtest"],
    "bench": ["dev"],
    "tests": ["dev"],
}


def imported(folder: str) -> dict[str, str]:
    """Top-level modules outside the standard library and this repo that `folder`'s code
    imports -> a file importing it."""
    found: dict[str, str] = {}
    for file in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OURS:
                    found.setdefault(top, str(file.relative_to(ROOT)))
    return found


def declared(extras: list[str]) -> set[str]:
    """Distributions pyproject.toml names: the dependencies and the given extras'."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(line).name) for line in lines}


@pytest.mark.parametrize("folder", sorted(EXTRAS))
def test_every_imported_library_is_a_declared_dependency(folder):
    names = declared(EXTRAS[folder])
    providers = md.packages_distributions()
    missing = {
        module: where
        for module, where in imported(folder).items()
        if not {canonicalize_name(d) for d in providers.get(module, [module])} & names
    }
    assert not missing, f"imported but not in pyproject.toml ({folder}): {missing}"
