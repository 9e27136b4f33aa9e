from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from serve_app.learn.profile import (
    PROFILE_SCHEMA,
    _waiting,
    expert_print,
    fingerprint,
    measures,
    reading_ease,
)


def test_reading_ease_is_flesch_with_dictionary_syllables():
    # 6 words, 1 sentence, 6 syllables: 206.835 - 1.015 * 6 - 84.6 * 1.
    assert reading_ease("The cat sat on the mat.") == pytest.approx(116.145)
    hard = "Institutional interoperability considerations necessitate comprehensive documentation."
    assert reading_ease(hard) < 0 < reading_ease("I like it. It is fun. We go now.")
    assert reading_ease("1234 + 5678 == {}") is None


def _row(expert, output):
    return {
        "prompt_id": "p",
        "text": "t",
        "domain": "d",
        "expert": expert,
        "loss": 1.0,
        "bytes": 1,
        "tokens": 1,
        "seconds": 0.1,
        "output": output,
    }


def test_verbosity_and_readability_come_from_the_sampled_outputs_only():
    table = pa.Table.from_pylist(
        [
            _row("a", "The cat sat on the mat."),
            _row("a", "Hi."),
            _row("a", None),  # not sampled: does not count
            _row("b", "12345"),  # no words: counts for length, not for readability
            _row("m", None),  # a fill-mask expert generates nothing
        ],
        schema=PROFILE_SCHEMA,
    )
    found = measures(table)
    assert found["a"]["verbosity"] == pytest.approx((23 + 3) / 2)
    assert found["a"]["readability"] == pytest.approx((116.145 + reading_ease("Hi.")) / 2)
    assert found["b"] == {"verbosity": 5.0, "readability": None}
    assert found["m"] == {"verbosity": None, "readability": None}


def test_the_fingerprint_changes_when_the_weights_do(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = fingerprint(str(tmp_path))
    assert fingerprint(str(tmp_path)) == before
    (tmp_path / "model.safetensors").write_bytes(b"123456")
    assert fingerprint(str(tmp_path)) != before
    assert fingerprint("org/model") == "org/model"


def test_a_named_revision_is_part_of_what_a_row_was_measured_with():
    from serve_app.config import ExpertConfig

    def expert(**kw):
        return ExpertConfig(
            name="a", model="org/a", task="fill-mask", params=1, released="2024-01-01", **kw
        )

    assert expert_print(expert()) == "org/a"  # as before: earlier profiles stay reusable
    assert expert_print(expert(revision="v2")) not in ("org/a", expert_print(expert(revision="v3")))


def test_rows_another_profile_measured_with_the_same_weights_are_reused_without_ray(tmp_path):
    import json
    import os
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq
    import ray

    from serve_app.config import ExpertConfig
    from serve_app.learn.data import Prompt
    from serve_app.learn.profile import FINGERPRINTS, profile

    prompts = [Prompt.of("one text", "d"), Prompt.of("another text", "d")]
    rows = [
        {**_row(e, None), "prompt_id": p.id, "text": p.text, "loss": loss}
        for p in prompts
        for e, loss in (("a", 1.5), ("b", 2.5))
    ]
    earlier = tmp_path / "profiles" / "router.parquet"
    earlier.parent.mkdir()
    measured_with = {FINGERPRINTS: json.dumps({"a": "org/a", "b": "org/b"}).encode()}
    table = pa.Table.from_pylist(rows, schema=PROFILE_SCHEMA).replace_schema_metadata(measured_with)
    pq.write_table(table, earlier)
    imported = tmp_path / "profiles" / "scores.parquet"  # imported scores: not ours to reuse
    pq.write_table(pa.table({"prompt_id": ["x"], "model": ["a"], "score": [1.0]}), imported)
    experts = [
        ExpertConfig(name=e, model=f"org/{e}", task="fill-mask", params=1, released="2024-01-01")
        for e in ("a", "b")
    ]

    # Each Ray started on this machine points session_latest at its own new session folder.
    latest = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "session_latest"
    session = latest.resolve() if latest.exists() else None
    relabelled = [Prompt(p.id, p.text, "e") for p in prompts]
    run = profile(experts, relabelled, tmp_path / "eval.parquet", reuse=[earlier, imported])
    assert (run.measured, run.reused) == (0, 4)
    assert sorted(run.table["loss"].to_pylist()) == [1.5, 1.5, 2.5, 2.5]
    assert set(run.table["domain"].to_pylist()) == {"e"}, "the data's domain, not the old row's"
    assert not ray.is_initialized()
    assert (latest.resolve() if latest.exists() else None) == session, "no Ray was started"

    # Expert b's weights changed since: its rows are not reused (profile would measure them).
    from serve_app.learn.profile import _done

    changed = _done(tmp_path / "new.parquet", {"a": "org/a", "b": "org/b-v2"}, [earlier])
    assert set(changed["expert"].to_pylist()) == {"a"}
    # Every expert's weights changed (a resumed demo build whose experts were retrained): no
    # row is reused, and the profile is measured anew rather than failing.
    none = _done(earlier, {"a": "org/a-v2", "b": "org/b-v2"}, [earlier])
    assert none.num_rows == 0 and none.schema == PROFILE_SCHEMA


def test_a_pool_scorer_measures_what_each_expert_s_own_scorer_does(smoke_library):
    # The two Ray Data workers without Ray (test_pipeline's slow test runs the pooled profile
    # through Ray): one pool actor that holds one expert at a time, loading each on demand,
    # against one scorer per expert, on the same rows.
    from serve_app.config import load_library
    from serve_app.learn.data import Prompt, prompts_table
    from serve_app.learn.profile import ExpertScorer, PoolScorer

    experts = load_library(smoke_library).experts
    prompts = [Prompt.of(t, "d") for t in ("Once upon a time", "The cat sat on the mat.")]
    base = prompts_table(prompts).append_column("generate", pa.array([True, False]))
    own = pa.concat_tables(ExpertScorer(e.name, e.model, e.task, 4)(base) for e in experts)
    rows = pa.concat_tables(
        base.append_column("expert", pa.array([e.name] * len(prompts), pa.string()))
        for e in experts
    )
    pool = PoolScorer({e.name: (e.model, e.task) for e in experts}, slots=1, new_tokens=4)
    halves = [rows.slice(0, 3), rows.slice(3)]  # a batch may start and end inside an expert
    by_pool = pa.concat_tables(pool(batch) for batch in halves)
    assert list(pool.held) == [experts[-1].name], "one slot: the last expert used stays"
    for column in ("prompt_id", "expert", "bytes", "tokens", "output"):
        assert by_pool[column].to_pylist() == own[column].to_pylist(), column
    assert by_pool["loss"].to_pylist() == pytest.approx(own["loss"].to_pylist(), rel=1e-6)
    assert by_pool.schema == PROFILE_SCHEMA
    writes = [e.name for e in experts if e.task == "text-generation"]
    assert sorted(r["expert"] for r in by_pool.to_pylist() if r["output"]) == sorted(writes)


def test_the_progress_bar_names_the_experts_it_still_waits_for_most_first():
    left = Counter({"gemma": 180, "smol": 60, "code-s": 0, "a": 5, "b": 1})
    assert _waiting(left) == "left: gemma 180, smol 60, a 5 and 1 more"
    assert _waiting(Counter({"smol": 2, "gemma": 0})) == "left: smol 2"
    assert _waiting(Counter({"gemma": 0})) == ""
