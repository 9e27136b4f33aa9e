"""Prompt data: `.jsonl` or `.parquet` files of rows with `text` (and optionally `domain`).

A data PATH is one such file or a directory searched recursively. A row without `domain`
takes the name of its file's parent directory, so `../shared/corpora/code/*.jsonl` is code.
Every prompt gets a stable id, a hash of its text: the same text has the same id in every
file and every run, which is what lets profiling resume and splits stay fixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = (".jsonl", ".parquet")
#: The shared domain corpora beside a checkout (tests, benchmarks and the load test use them
#: when they are there; nothing from them is copied into the project).
SHARED_CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"
#: Standard-library modules read for the corpus every Python has, by domain.
STDLIB_DOMAINS: dict[str, tuple[str, ...]] = {
    "text": ("textwrap", "difflib", "string", "shlex", "html"),
    "numbers": ("statistics", "fractions", "decimal", "random", "colorsys"),
    "web": ("urllib.parse", "http.cookies", "email.message", "mimetypes", "ipaddress"),
    "data": ("json.encoder", "csv", "configparser", "plistlib", "tomllib"),
}


class DataError(ValueError):
    """A data path that cannot be read; the message names the file and the row."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a data path."""

    id: str
    text: str
    domain: str

    @classmethod
    def of(cls, text: str, domain: str) -> Prompt:
        """A prompt with its id computed from the text."""
        return cls(prompt_id(text), text, domain)


def cut_text(text: str, chars: int) -> str:
    """At most `chars` characters, cut at a space where one is in the second half."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    space = head.rfind(" ")
    return head[:space] if space > chars // 2 else head


def prompt_id(text: str) -> str:
    """Stable id of a text: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def data_files(path: str | Path) -> list[Path]:
    """The data files of a path, sorted: the path itself or every data file below it."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: not a data file; use {' or '.join(SUFFIXES)}")
        return [path]
    if not path.is_dir():
        raise DataError(f"no data at {path}")
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no {' or '.join(SUFFIXES)} files below it")
    return files


def _rows(file: Path) -> list[dict]:
    if file.suffix == ".parquet":
        table = pq.read_table(file)
        if "text" not in table.column_names:
            raise DataError(f"{file}: no 'text' column; columns: {', '.join(table.column_names)}")
        keep = [c for c in ("text", "domain") if c in table.column_names]
        return table.select(keep).to_pylist()
    return [row for _, row in jsonl_rows(file)]


def jsonl_rows(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a JSONL file whose row is an object with
    a string `text`; DataError naming the file and line otherwise."""
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}:{n}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{file}:{n}: a row needs a string 'text'")
            yield n, row


def read_rows(path: str | Path) -> Iterator[tuple[str, str]]:
    """(text, domain) of every row under `path`, in file order, duplicates kept: for commands
    that answer row by row (tryage route)."""
    for file in data_files(path):
        for row in _rows(file):
            yield row["text"], str(row.get("domain") or file.parent.name)


def load_prompts(
    path: str | Path, per_domain: int | None = None, seed: int = 0, min_chars: int = 1
) -> list[Prompt]:
    """Every distinct prompt under `path`, or a seeded sample of `per_domain` per domain.

    Duplicates (same text) are kept once. The order is fixed by the texts and the seed, not
    by the file system, so the same data gives the same prompts on every machine.
    """
    seen: dict[str, Prompt] = {}
    for file in data_files(path):
        for row in _rows(file):
            text = row["text"]
            if len(text.strip()) < min_chars:
                continue
            domain = row.get("domain") or file.parent.name
            pid = prompt_id(text)
            seen.setdefault(pid, Prompt(pid, text, str(domain)))
    # A seeded shuffle, the same everywhere: order by a hash of (seed, id).
    order = sorted(seen.values(), key=lambda p: _draw(seed, p.id))
    if per_domain is not None:
        counts: dict[str, int] = {}
        kept = []
        for p in order:
            if counts.get(p.domain, 0) < per_domain:
                counts[p.domain] = counts.get(p.domain, 0) + 1
                kept.append(p)
        order = kept
    return order


def _draw(seed: int, pid: str) -> str:
    return hashlib.sha1(f"{seed}:{pid}".encode()).hexdigest()


def in_split(pid: str, fraction: float, seed: int = 0) -> bool:
    """Whether a prompt falls in a held-out split of `fraction`; fixed by its id and the seed.

    Salted apart from the sampling order of `load_prompts`: a sample drawn there is not all
    on one side of a split.
    """
    return unit_draw(pid, seed, "split") < fraction


def unit_draw(pid: str, seed: int, salt: str) -> float:
    """A number in [0, 1] fixed by a prompt's id, the seed and `salt` (one salt per use, so
    two splits drawn for the same prompts are independent)."""
    return int(_draw(seed, f"{salt}:{pid}")[:8], 16) / 0xFFFFFFFF


def prompts_table(prompts: list[Prompt]) -> pa.Table:
    """Prompts as a table of id, text, domain."""
    return pa.table(
        {
            "prompt_id": [p.id for p in prompts],
            "text": [p.text for p in prompts],
            "domain": [p.domain for p in prompts],
        }
    )


def stdlib_prompts(min_chars: int = 80, max_chars: int = 3000) -> list[Prompt]:
    """Real text every Python has: docstrings and function source of standard modules, by
    STDLIB_DOMAINS, in a fixed order."""
    out: list[Prompt] = []
    for domain, modules in STDLIB_DOMAINS.items():
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for text in _module_texts(module):
                if min_chars <= len(text) <= max_chars:
                    out.append(Prompt(prompt_id(text), text, domain))
    return out


def _module_texts(module: Any) -> list[str]:
    """The module's docstring, and each public function's docstring and source."""
    texts = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            texts.append(inspect.getdoc(obj) or "")
            with contextlib.suppress(OSError, TypeError):  # no source: a C extension
                texts.append(inspect.getsource(obj))
    return texts
