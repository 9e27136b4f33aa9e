"""Reference pages generated from the pydantic models' field descriptions, so the docs cannot
drift from the code: `python -m serve_app.reference` rewrites them, and a test fails when a
page in docs/reference/ differs from what this module generates."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from serve_app import config, protocol

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "library.md": (
        "# library.yaml reference",
        "Every key of a library file, generated from `serve_app/config.py` "
        "(`python -m serve_app.reference`). Unknown keys are refused; relative paths are "
        "relative to the file. The prose guide is [../library.md](../library.md).",
        [
            ("Top level", config.LibraryConfig),
            ("router", config.RouterConfig),
            ("experts[]", config.ExpertConfig),
            ("objective", config.ObjectiveConfig),
            ("ingress", config.IngressConfig),
            ("policy", config.PolicyConfig),
            ("pools.<name>", config.PoolConfig),
            (
                "batching (router.batching, experts[].batching, pools.<name>.batching)",
                config.Batching,
            ),
        ],
    ),
    "http.md": (
        "# HTTP reference",
        "Request and response bodies of the ingress, generated from `serve_app/protocol.py` "
        "(`python -m serve_app.reference`). The live schema is the service's "
        "`/openapi.json`; the guide is [../http.md](../http.md).",
        [
            ("POST /v1/route", protocol.RouteRequest),
            ("POST /v1/infer", protocol.InferRequest),
            ("Ranking entries", protocol.RankedOut),
            ("/v1/infer answer", protocol.InferResponse),
            ("The `tryage` object of OpenAI requests", protocol.RoutingOptions),
            ("POST /v1/completions", protocol.CompletionRequest),
            ("POST /v1/chat/completions", protocol.ChatRequest),
            ("Errors: the `error` object", protocol.ErrorDetail),
        ],
    ),
}


def _type(annotation: Any) -> str:
    """A short readable type: `int | None`, `list[str]`, `dict[str, float]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    origin = get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "None")
    args = ", ".join(_type(a) for a in get_args(annotation))
    name = getattr(origin, "__name__", str(origin))
    if name in ("Union", "UnionType"):
        return " | ".join(_type(a) for a in get_args(annotation))
    if name == "Literal":
        return " | ".join(repr(a) for a in get_args(annotation))
    return f"{name}[{args}]"


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel) and not isinstance(value, config.Batching):
            return "its section's defaults"
        return f"`{value.model_dump() if isinstance(value, BaseModel) else value}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default!r}`" if field.default is not None else "`None`"


def table(model: type[BaseModel]) -> list[str]:
    """A Markdown table of a model's fields: key, type, default, description."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        text = (field.description or model.__doc__ or "").replace("|", "\\|").replace("\n", " ")
        kind = _type(field.annotation).replace("|", "\\|")
        default = _default(field).replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default} | {text} |")
    return lines


def page(name: str) -> str:
    """The text of one reference page."""
    title, intro, sections = PAGES[name]
    lines = [title, "", intro]
    for heading, model in sections:
        lines += ["", f"## {heading}", "", (model.__doc__ or "").strip(), "", *table(model)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/reference/*.md."""
    out = ROOT / "docs" / "reference"
    out.mkdir(parents=True, exist_ok=True)
    for name in PAGES:
        (out / name).write_text(page(name))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
