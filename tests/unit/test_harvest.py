"""The demo's harvest of domain corpora from what every Python installation has."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sysconfig
import textwrap
import warnings
from pathlib import Path

import pytest

from serve_app.demo.harvest import (
    DOMAINS,
    code_blocks,
    harvest,
    pack,
    paragraphs,
    prose_docs,
    select,
)
from serve_app.learn.data import load_prompts

MAX_DOCS = 300
LEGAL_WORDS = re.compile(r"licen[cs]e|warrant|permission|copyright|liabil", re.IGNORECASE)


@pytest.fixture(scope="module")
def harvested(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """One harvest of every domain (a few seconds: the standard library is parsed)."""
    out = tmp_path_factory.mktemp("harvest")
    return out, harvest(out, max_docs=MAX_DOCS, progress=False)


def rows(out: Path, domain: str) -> list[dict]:
    return [
        json.loads(line)
        for file in sorted((out / domain).glob("*.jsonl"))
        for line in file.read_text(encoding="utf-8").splitlines()
    ]


def flat(text: str) -> str:
    return " ".join(text.split())


def parses(code: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return False
    return True


# --- On this machine's Python ---------------------------------------------------------------


def test_every_domain_is_harvested_with_enough_documents(harvested):
    out, counts = harvested
    assert list(counts) == list(DOMAINS) == ["code", "legal", "docs", "readme"]
    for domain, n in counts.items():
        assert 100 <= n <= MAX_DOCS, (domain, n)
        assert len(rows(out, domain)) == n
        assert [p.name for p in (out / domain).iterdir()] != []


def test_documents_are_within_bounds_distinct_and_labelled(harvested):
    out, _ = harvested
    for domain in DOMAINS:
        docs = rows(out, domain)
        assert all(set(r) == {"text", "source", "domain"} for r in docs)
        assert {r["domain"] for r in docs} == {domain}
        assert all(200 <= len(r["text"]) <= 1500 for r in docs), domain
        assert len({r["text"] for r in docs}) == len(docs), f"duplicates in {domain}"
        assert all(r["text"] == r["text"].rstrip() for r in docs)


def test_load_prompts_reads_the_harvest_with_its_domains(harvested):
    out, counts = harvested
    domains_of: dict[str, set[str]] = {}
    for domain in DOMAINS:
        for r in rows(out, domain):
            domains_of.setdefault(r["text"], set()).add(domain)
    prompts = load_prompts(out)
    # A text in two domains (a README quoting a license) is read once, under one of them.
    assert len(prompts) == len(domains_of) >= sum(counts.values()) - 5
    assert all(p.domain in domains_of[p.text] for p in prompts)
    assert {p.domain for p in prompts} == set(DOMAINS)


def test_two_runs_write_identical_files(harvested, tmp_path):
    out, counts = harvested
    assert harvest(tmp_path, max_docs=MAX_DOCS, progress=False) == counts
    files = sorted(p.relative_to(out) for p in out.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    assert len(files) == len(DOMAINS)
    for file in files:
        assert (out / file).read_bytes() == (tmp_path / file).read_bytes(), file


def test_code_is_standard_library_source_kept_verbatim(harvested):
    out, _ = harvested
    docs = rows(out, "code")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for r in docs[:50]:
        origin, path = r["source"].split(":", 1)
        assert origin == "stdlib" and not re.search(r"(^|/)tests?/", path), r["source"]
        assert flat(r["text"]) in flat((stdlib / path).read_text(errors="ignore"))
    assert sum(parses(r["text"]) for r in docs) > 0.5 * len(docs)
    assert any("\n    " in r["text"] for r in docs), "indentation kept"


def test_legal_documents_read_like_licenses(harvested):
    out, _ = harvested
    docs = rows(out, "legal")
    assert sum(bool(LEGAL_WORDS.search(r["text"])) for r in docs) > 0.8 * len(docs)
    assert not any(parses(r["text"]) for r in docs)
    assert len({r["source"].split(":")[0] for r in docs}) >= 10, "many distributions"


def test_docs_come_from_the_pydoc_topics(harvested):
    from pydoc_data.topics import topics

    out, _ = harvested
    for r in rows(out, "docs"):
        origin, topic = r["source"].split(":", 1)
        assert origin == "pydoc_data.topics"
        assert flat(r["text"]) in flat(topics[topic]), r["source"]


def test_readme_documents_come_from_package_metadata(harvested):
    out, _ = harvested
    docs = rows(out, "readme")
    for r in docs:
        name, file = r["source"].rsplit(":", 1)
        assert file == "METADATA"
        body = importlib.metadata.distribution(name).metadata.get_payload()
        assert flat(r["text"]) in flat(body), r["source"]
    assert len({r["source"] for r in docs}) >= 10, "many distributions"
    assert sum(bool(LEGAL_WORDS.search(r["text"])) for r in docs) < 0.5 * len(docs)


def test_other_domains_do_not_look_like_code_or_licenses(harvested):
    out, _ = harvested
    for domain in ("docs", "readme"):
        docs = rows(out, domain)
        assert sum(parses(r["text"]) for r in docs) < 0.05 * len(docs), domain
    code = rows(out, "code")
    assert sum(bool(LEGAL_WORDS.search(r["text"])) for r in code) < 0.2 * len(code)


def test_an_unknown_domain_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"unknown domain 'lgal'; known: code, legal, docs"):
        harvest(tmp_path, domains=["docs", "lgal"], progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_docs": 0}, "max_docs"),
        ({"min_chars": 500, "max_chars": 100}, "min_chars <= max_chars"),
    ],
)
def test_bad_sizes_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        harvest(tmp_path, progress=False, **kwargs)


def test_a_subset_of_domains_and_the_seed_choose_what_is_written(tmp_path):
    first = harvest(tmp_path / "a", domains=["docs"], max_docs=20, seed=1, progress=False)
    again = harvest(tmp_path / "b", domains=["docs"], max_docs=20, seed=2, progress=False)
    assert first == again == {"docs": 20}
    assert [p.name for p in tmp_path.joinpath("a").iterdir()] == ["docs"]
    texts_a = [r["text"] for r in rows(tmp_path / "a", "docs")]
    assert texts_a != [r["text"] for r in rows(tmp_path / "b", "docs")]


# --- Pure text functions -------------------------------------------------------------------


def test_paragraphs_collapse_whitespace_and_keep_relative_indentation():
    text = "  Title   here \n\n\n   Some\t text,  wrapped\n   over lines.\n\n     x = 1\n       y\n"
    assert paragraphs(text) == ["Title here", "Some text, wrapped\nover lines.", "x = 1\n  y"]


def test_pack_merges_consecutive_pieces_up_to_the_maximum():
    a, b, c, d = "a" * 40, "b" * 40, "c" * 40, "d" * 5
    assert pack([a, b, c, d], "\n\n", 10, 100) == [f"{a}\n\n{b}", f"{c}\n\n{d}"]
    assert pack([a, b, c, d], "\n\n", 50, 100) == [f"{a}\n\n{b}"], "47 chars are too few"
    assert pack(["tiny"], "\n\n", 10, 100) == []


def test_a_paragraph_too_long_is_split_at_lines_then_words():
    lines = [f"line {i} " + "w" * 30 for i in range(10)]
    docs = prose_docs("\n".join(lines), 20, 100)
    assert all(20 <= len(d) <= 100 for d in docs)
    assert "\n".join(docs).split("\n") == lines
    words = prose_docs(" ".join(["word"] * 100), 10, 60)
    assert all(10 <= len(d) <= 60 for d in words)
    assert " ".join(words).split() == ["word"] * 100


def test_code_blocks_are_top_level_statements_with_their_comments_and_decorators():
    source = textwrap.dedent(
        '''\
        """Module doc."""
        import os


        # About f.
        @decorator
        def f():
            return 1

        x = [
            1,
        ]
        '''
    )
    assert code_blocks(source) == [
        '"""Module doc."""',
        "import os",
        "# About f.\n@decorator\ndef f():\n    return 1",
        "x = [\n    1,\n]",
    ]
    assert code_blocks("def broken(:\n") == []


def test_select_is_seeded_distinct_and_keeps_the_first_source():
    docs = [("b", "s1"), ("a", "s1"), ("b", "s2"), ("c", "s3")]
    chosen = select(docs, max_docs=10, seed=0)
    assert sorted(chosen) == [("a", "s1"), ("b", "s1"), ("c", "s3")]
    assert [t for t, _ in select(reversed(docs), 10, 0)] == [t for t, _ in chosen]
    assert len(select(docs, max_docs=2, seed=0)) == 2
    many = [(str(i), "s") for i in range(50)]
    assert select(many, 50, 0) != select(many, 50, 1)


def test_this_project_s_own_distribution_is_left_out():
    from serve_app.demo.harvest import _distributions

    assert importlib.metadata.distribution("tryage")  # installed (editable) beside the others
    names = {d.metadata["Name"].lower() for d in _distributions()}
    assert "tryage" not in names and "torch" in names
