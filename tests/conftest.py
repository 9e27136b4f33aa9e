"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.learn.data import SHARED_CORPORA

ROOT = Path(__file__).resolve().parents[1]
#: Real text in domain folders, beside the repository (see its MANIFEST.md).
CORPORA = SHARED_CORPORA
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
    from serve_app.learn.data import stdlib_prompts

    out: dict[str, list[str]] = {}
    seen: set[str] = set()  # texts that share their first `chars` characters count once
    for p in stdlib_prompts():
        texts = out.setdefault(p.domain, [])
        if len(texts) < n and p.text[:chars] not in seen:
            seen.add(p.text[:chars])
            texts.append(p.text[:chars])
    return out


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


@pytest.fixture(scope="session")
def smoke_library(tmp_path_factory) -> Path:
    """The smoke library's `library.yaml`, built once for the session (unit and integration
    tests): it trains a tokenizer and saves models."""
    from serve_app.demo.smoke import build_smoke_library

    return build_smoke_library(tmp_path_factory.mktemp("smoke"))
