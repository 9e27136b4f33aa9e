from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    """The smoke library's `library.yaml` (built once: it trains a tokenizer and saves models)."""
    from serve_app.demo.smoke import build_smoke_library

    return build_smoke_library(tmp_path_factory.mktemp("smoke"))
