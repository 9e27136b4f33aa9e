"""Domain corpora from text every Python installation already has, for the offline demo.

With no user corpus, the demo trains its experts on four domains harvested from the machine:
the standard library's source (`code`), license texts of installed packages (`legal`), the
language reference's prose (`docs`) and package READMEs (`readme`). The output has the shape of
`../shared/corpora`: `OUT/<domain>/<source-name>.jsonl`, one `{"text", "source", "domain"}`
object a line, so `serve_app.learn.data.load_prompts(OUT)` reads it.

Documents are built by merging consecutive paragraphs (prose) or top-level statements (code)
until one more would pass `max_chars`; a piece too long on its own is split at blank lines,
then lines, then spaces. Prose is whitespace-normalised line by line (runs of whitespace become
one space, lines are stripped, paragraphs are separated by one blank line); code is kept as is.
Exact duplicates are dropped, and at most `max_docs` a domain are kept in a seeded order that is
the same on every machine. The same machine gives byte-identical files on every run.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import itertools
import json
import os
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

#: Domain name -> what its documents hold.
DOMAINS: dict[str, str] = {
    "code": "Python source code of the standard library, in top-level statements",
    "legal": "License texts of installed packages, of Python and of the system's common licenses",
    "docs": "Prose of Python's language reference (pydoc topics)",
    "readme": "README long descriptions of installed packages (Markdown and reST)",
}

#: Standard-library folders that are tests, third-party packages, caches or another domain's text.
CODE_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
#: `pydoc_data/topics.py` is the `docs` domain's text in a Python string: not code.
CODE_SKIP_FILES = frozenset({"pydoc_data/topics.py"})
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
#: Files named like licenses that are not license texts.
LICENSE_SKIP_SUFFIXES = frozenset({".py", ".pyc", ".pyi", ".so", ".pyd", ".dll", ".dylib"})
COMMON_LICENSES = Path("/usr/share/common-licenses")
#: Bigger files are data, not text a person wrote; they are skipped.
MAX_FILE_BYTES = 2_000_000

Source = tuple[str, str]  # (source name, raw text)


# --- Pure text functions -------------------------------------------------------------------


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs of `text`, split at blank lines and whitespace-normalised: runs of
    whitespace within a line become one space, and each paragraph is dedented (indentation
    past its margin is kept: it is the structure of code examples and lists)."""
    out: list[str] = []
    lines: list[str] = []
    for raw in text.expandtabs(4).split("\n"):
        words = raw.split()
        if words:
            lines.append(" " * (len(raw) - len(raw.lstrip())) + " ".join(words))
        elif lines:
            out.append(_dedent(lines))
            lines = []
    if lines:
        out.append(_dedent(lines))
    return out


def _dedent(lines: list[str]) -> str:
    margin = min(len(line) - len(line.lstrip(" ")) for line in lines)
    return "\n".join(line[margin:] for line in lines)


def code_blocks(source: str) -> list[str]:
    """Top-level statements of Python `source`, each with its decorators and the comments just
    above it, kept verbatim (trailing whitespace dropped); [] if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.split("\n")
    starts = [1]  # the module header (shebang, comments) goes with the first statement
    for node in tree.body[1:]:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        while first - 1 > starts[-1] and lines[first - 2].startswith("#"):
            first -= 1  # a comment right above a statement belongs to it
        if first > starts[-1]:
            starts.append(first)
    bounds = [*starts, len(lines) + 1]
    blocks = ("\n".join(lines[a - 1 : b - 1]) for a, b in itertools.pairwise(bounds))
    return [b for b in (_trim(block) for block in blocks) if b]


def pack(pieces: Iterable[str], sep: str, min_chars: int, max_chars: int) -> list[str]:
    """Documents of `min_chars..max_chars` characters: consecutive `pieces` joined by `sep`
    until one more would pass `max_chars`. A piece too long alone is split (see `_split`)."""
    docs: list[str] = []
    group: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal group, size
        doc = _trim(sep.join(group))
        if min_chars <= len(doc) <= max_chars:
            docs.append(doc)
        group, size = [], 0

    for piece in pieces:
        if len(piece) > max_chars:
            flush()
            parts, part_sep = _split(piece)
            docs += pack(parts, part_sep, min_chars, max_chars)
            continue
        added = len(piece) + (len(sep) if group else 0)
        if group and size + added > max_chars:
            flush()
            added = len(piece)
        group.append(piece)
        size += added
    flush()
    return docs


def _split(piece: str) -> tuple[list[str], str]:
    """A long piece's parts and their separator: blank-line groups, else lines, else words."""
    groups = [g for g in (_trim(g) for g in re.split(r"\n[ \t]*\n", piece)) if g]
    if len(groups) > 1:
        return groups, "\n\n"
    if "\n" in piece:
        return piece.split("\n"), "\n"
    return piece.split(" "), " "  # a word longer than max_chars is dropped by `pack`


def _trim(text: str) -> str:
    """Text without leading blank lines and trailing whitespace (indentation kept)."""
    return re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip()


def prose_docs(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Documents of prose `text`: whitespace-normalised paragraphs, packed."""
    return pack(paragraphs(text), "\n\n", min_chars, max_chars)


def code_docs(source: str, min_chars: int, max_chars: int) -> list[str]:
    """Documents of Python `source`: top-level statements, packed, kept verbatim."""
    return pack(code_blocks(source), "\n\n", min_chars, max_chars)


def rank(text: str, seed: int) -> str:
    """A document's place in the seeded order, the same on every machine."""
    return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()


def select(docs: Iterable[tuple[str, str]], max_docs: int, seed: int) -> list[tuple[str, str]]:
    """At most `max_docs` distinct (text, source) documents in the seeded order; a text seen
    twice keeps its first source."""
    first: dict[str, str] = {}
    for text, source in docs:
        first.setdefault(text, source)
    order = sorted(first, key=lambda text: rank(text, seed))
    return [(text, first[text]) for text in order[:max_docs]]


def _clean(text: str) -> str:
    """Text that encodes to UTF-8 (lone surrogates dropped), with Unix newlines."""
    text = text.encode("utf-8", "ignore").decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- Sources on this machine ---------------------------------------------------------------


def _read(path: Path) -> str | None:
    """A text file's content, or None for a missing, big or binary file."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    return _clean(data.decode("utf-8", errors="ignore"))


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's `.py` files under `root`, sorted, without tests and packages."""
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in CODE_SKIP_DIRS)
        for name in sorted(names):
            path = Path(folder, name)
            if name.endswith(".py") and path.relative_to(root).as_posix() not in CODE_SKIP_FILES:
                files.append(path)
    return files


def code_sources() -> Iterator[Source]:
    """The standard library's source files."""
    root = _stdlib()
    for path in stdlib_files(root):
        text = _read(path)
        if text:
            yield f"stdlib:{path.relative_to(root).as_posix()}", text


#: Distributions left out: this project's own README shows answers of the demo built from the
#: harvest, which must not change when the README does.
SELF = ("tryage",)


def _distributions() -> list[importlib.metadata.Distribution]:
    """Installed distributions, one a name (the first on sys.path, as import sees them),
    sorted by name; this project left out."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and name.lower() not in SELF:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist)
    return [found[name] for name in sorted(found)]


def _is_license_file(path: importlib.metadata.PackagePath) -> bool:
    if path.suffix.lower() in LICENSE_SKIP_SUFFIXES:
        return False
    in_licenses = "licenses" in path.parts[:-1] and any(".dist-info" in p for p in path.parts)
    return in_licenses or path.name.upper().startswith(LICENSE_PREFIXES)


def legal_sources() -> Iterator[Source]:
    """License texts: installed distributions' license files and `License-File` entries,
    Python's LICENSE.txt, the system's common licenses."""
    for dist in _distributions():
        name = dist.metadata["Name"]
        for file in sorted(dist.files or [], key=str):
            if _is_license_file(file):
                text = _read(Path(dist.locate_file(file)))
                if text:
                    yield f"{name}:{file.as_posix()}", text
        for entry in sorted(set(dist.metadata.get_all("License-File") or [])):
            for where in (f"licenses/{entry}", entry):  # metadata 2.4 moved them to licenses/
                text = _dist_text(dist, where)
                if text:
                    yield f"{name}:{where}", text
                    break
    for path in (_stdlib() / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"):
        text = _read(path)
        if text:
            yield "python:LICENSE.txt", text
            break
    if COMMON_LICENSES.is_dir():
        for path in sorted(COMMON_LICENSES.iterdir()):
            text = _read(path)
            if text:
                yield f"common-licenses:{path.name}", text


def _dist_text(dist: importlib.metadata.Distribution, name: str) -> str | None:
    try:
        text = dist.read_text(name)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return _clean(text) if text else None


def docs_sources() -> Iterator[Source]:
    """Python's reference documentation, topic by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the docs apart
        return
    for topic in sorted(topics):
        yield f"pydoc_data.topics:{topic}", _clean(topics[topic])


def readme_sources() -> Iterator[Source]:
    """Installed distributions' long descriptions (the body of METADATA)."""
    for dist in _distributions():
        try:
            body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        except (OSError, UnicodeDecodeError):
            continue
        if isinstance(body, str) and body.strip() and body.strip() != "UNKNOWN":
            yield f"{dist.metadata['Name']}:METADATA", _clean(body)


#: Domain -> (output file stem, its sources, how a source becomes documents).
_HARVESTERS: dict[str, tuple[str, Callable[[], Iterator[Source]], Callable[..., list[str]]]] = {
    "code": ("python_stdlib", code_sources, code_docs),
    "legal": ("licenses", legal_sources, prose_docs),
    "docs": ("pydoc_topics", docs_sources, prose_docs),
    "readme": ("package_readmes", readme_sources, prose_docs),
}
assert set(_HARVESTERS) == set(DOMAINS), "every domain needs a harvester"


# --- The harvest ---------------------------------------------------------------------------


def harvest(
    out: Path,
    *,
    domains: Sequence[str] = tuple(DOMAINS),
    max_docs: int = 1500,
    min_chars: int = 200,
    max_chars: int = 1500,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, int]:
    """Write out/<domain>/<source-name>.jsonl for each domain; return documents per domain."""
    domains = list(dict.fromkeys([domains] if isinstance(domains, str) else domains))
    _check(domains, max_docs, min_chars, max_chars)
    counts: dict[str, int] = {}
    for domain in domains:
        start = time.perf_counter()
        stem, sources, to_docs = _HARVESTERS[domain]
        candidates = (
            (doc, source)
            for source, text in sources()
            for doc in to_docs(text, min_chars, max_chars)
        )
        docs = select(candidates, max_docs, seed)
        path = Path(out) / domain / f"{stem}.jsonl"
        write_jsonl(path, docs, domain)
        counts[domain] = len(docs)
        if progress:
            seconds = time.perf_counter() - start
            print(
                f"harvest: {domain}: {len(docs)} documents in {seconds:.1f}s -> {path}",
                file=sys.stderr,
            )
    return counts


def _check(domains: Sequence[str], max_docs: int, min_chars: int, max_chars: int) -> None:
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain {unknown[0]!r}; known: {', '.join(DOMAINS)}")
    if max_docs < 1:
        raise ValueError(f"max_docs must be at least 1, got {max_docs}")
    if not 1 <= min_chars <= max_chars:
        raise ValueError(
            f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )


def write_jsonl(path: Path, docs: Sequence[tuple[str, str]], domain: str) -> None:
    """Write (text, source) documents as `{"text", "source", "domain"}` lines, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"text": text, "source": source, "domain": domain}, ensure_ascii=False) + "\n"
        for text, source in docs
    ]
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
