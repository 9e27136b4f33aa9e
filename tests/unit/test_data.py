from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.learn.data import DataError, in_split, load_prompts, prompt_id


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_row_without_domain_takes_its_folder_name_and_duplicates_count_once(tmp_path):
    write_jsonl(tmp_path / "code" / "a.jsonl", [{"text": "def f(): pass"}, {"text": "x = 1"}])
    write_jsonl(
        tmp_path / "news" / "deep" / "b.jsonl", [{"text": "Stocks rose.", "domain": "finance"}]
    )
    (tmp_path / "german").mkdir()
    pq.write_table(
        pa.table({"text": ["x = 1", "Der Hund bellt."]}), tmp_path / "german" / "c.parquet"
    )
    prompts = load_prompts(tmp_path)
    by_text = {p.text: p.domain for p in prompts}
    assert by_text == {
        "def f(): pass": "code",
        "x = 1": "code",  # seen first in code/, the parquet copy is a duplicate
        "Stocks rose.": "finance",
        "Der Hund bellt.": "german",
    }
    assert all(p.id == prompt_id(p.text) for p in prompts)


def test_a_sample_per_domain_is_seeded_and_the_same_on_every_call(tmp_path):
    write_jsonl(tmp_path / "a" / "x.jsonl", [{"text": f"a{i}"} for i in range(20)])
    write_jsonl(tmp_path / "b" / "x.jsonl", [{"text": f"b{i}"} for i in range(20)])
    first = load_prompts(tmp_path, per_domain=3, seed=1)
    assert [p.domain for p in first].count("a") == 3
    assert [p.domain for p in first].count("b") == 3
    assert first == load_prompts(tmp_path, per_domain=3, seed=1)
    assert first != load_prompts(tmp_path, per_domain=3, seed=2)


def test_bad_data_names_the_file_and_line(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not JSON"):
        load_prompts(tmp_path)
    (tmp_path / "d" / "x.jsonl").write_text('{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: a row needs a string 'text'"):
        load_prompts(tmp_path)
    with pytest.raises(DataError, match="no data at"):
        load_prompts(tmp_path / "missing")
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"no .jsonl or .parquet files"):
        load_prompts(tmp_path / "e")


def test_the_split_holds_out_its_fraction_independently_of_the_sample(tmp_path):
    ids = [prompt_id(str(i)) for i in range(2000)]
    share = sum(in_split(i, 0.2) for i in ids) / len(ids)
    assert 0.17 < share < 0.23
    # The prompts a sample keeps are not all on one side of the split.
    write_jsonl(tmp_path / "a" / "x.jsonl", [{"text": str(i)} for i in range(2000)])
    sample = load_prompts(tmp_path, per_domain=200)
    share = sum(in_split(p.id, 0.2) for p in sample) / len(sample)
    assert 0.08 < share < 0.35  # 200 draws: about 0.2 give or take 0.03
