"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Real text in domain folders, beside the repository (see its MANIFEST.md).
CORPORA = ROOT.parent / "shared" / "corpora"
#: Domains the pipeline tests use, with prompts per domain and characters per prompt.
DOMAINS = ("code", "german", "legal", "math", "clinical")


def _from_corpora(n: int, chars: int) -> dict[str, list[str]]:
    out = {}
    for domain in DOMAINS:
        texts = []
        for file in sorted((CORPORA / domain).glob("*.jsonl")):
            with file.open() as f:
                texts += [
                    json.loads(line)["text"][:chars] for _, line in zip(range(n), f, strict=False)
                ]
        out[domain] = texts[:n]
    return out


def _from_stdlib(n: int, chars: int) -> dict[str, list[str]]:
    """Real text any Python has, where the corpora are not beside the checkout."""
    import inspect
    import json as json_module

    out: dict[str, list[str]] = {"code": [], "docs": []}
    for module in (json_module, textwrap, inspect):
        source = Path(inspect.getfile(module)).read_text()
        out["code"] += [source[i : i + chars] for i in range(0, chars * n, chars)]
        out["docs"] += [
            inspect.getdoc(obj)[:chars]
            for _, obj in inspect.getmembers(module)
            if inspect.isfunction(obj) and inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 80
        ]
    return {domain: texts[:n] for domain, texts in out.items()}


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """A data folder of real prompts, one sub-folder per domain (6 prompts of 300 characters
    each), taken from ../shared/corpora when it is there."""
    found = _from_corpora(6, 300) if CORPORA.is_dir() else _from_stdlib(6, 300)
    root = tmp_path_factory.mktemp("data")
    for domain, texts in found.items():
        (root / domain).mkdir()
        lines = [json.dumps({"text": t}) for t in texts]
        (root / domain / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root
