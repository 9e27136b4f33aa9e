"""The generated reference pages are up to date, and every docs link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serve_app import reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(reference.PAGES))
def test_the_reference_page_is_what_the_models_generate(name):
    page = ROOT / "docs" / "reference" / name
    assert page.read_text() == reference.page(name), (
        f"docs/reference/{name} is stale: run `python -m serve_app.reference`"
    )


def test_every_config_field_is_described():
    for _, _, sections in reference.PAGES.values():
        for _, model in sections:
            for field_name, field in model.model_fields.items():
                assert field.description, f"{model.__name__}.{field_name} has no description"


def test_the_library_reference_names_every_key():
    text = (ROOT / "docs" / "reference" / "library.md").read_text()
    for key in ("trusted", "checkpoint", "max_new_tokens", "target_ongoing_requests"):
        assert key in text


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))], ids=lambda p: p.name
)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code is not links
    for target in _LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
