"""Profiling: every expert of a library on every prompt of a data path, as one Ray job.

Each expert gets its own Ray Data actor pool (`map_batches` with the expert's resources from
library.yaml), so on a cluster every expert runs on the nodes that fit it, all at once. The
result is one Parquet table, PROFILE_SCHEMA, one row per (prompt, expert):

    prompt_id  string   stable hash of the text (serve_app.learn.data.prompt_id)
    text       string   the prompt
    domain     string   its domain (the file's folder when the row has none)
    expert     string   expert name
    loss       float64  bits per UTF-8 byte of the text under the expert (serve_app.experts)
    bytes      int64    UTF-8 bytes the loss covers (the text, or the part that fit the context)
    tokens     int64    tokens the loss covers, in the expert's own tokenizer
    seconds    float64  scoring time of the row's batch, divided by the batch's rows
    output     string   for a sample of prompts and text-generation experts: a greedy
                        continuation of the text's opening; null elsewhere

Rerunning with the same output file keeps every (prompt, expert) row already measured with
the same expert weights and only measures the rest; rows of other profiles (`reuse`) are kept
the same way. Rows land in `FILE.parts/` as they are made, so an interrupted run resumes where
it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_app.config import ExpertConfig, LibraryError, PoolConfig
from serve_app.learn.data import Prompt, prompts_table

PROFILE_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("expert", pa.string(), nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("output", pa.string()),
    ]
)
#: Parquet metadata key: {expert name: fingerprint of its weights} the rows were made with.
FINGERPRINTS = b"tryage.experts"
#: Characters of a prompt's opening that a sampled generation continues.
OPENING_CHARS = 200


# --- readability and verbosity ------------------------------------------------------------

_SENTENCE = re.compile(r"[.!?]+(?:\s|$)")
_WORD = re.compile(r"[A-Za-zÀ-ÿ]+(?:'[A-Za-z]+)?")


def reading_ease(text: str) -> float | None:
    """Flesch reading ease: 206.835 - 1.015 words/sentence - 84.6 syllables/word.

    Higher is easier (90-100: very easy; 0-30: very hard; code and gibberish go below 0).
    Syllables come from pyphen's English hyphenation dictionary (one more than the
    hyphenation points of a word). None for a text without words.
    """
    words = _WORD.findall(text)
    if not words:
        return None
    dic = _hyphenator()
    syllables = sum(len(dic.positions(w.lower())) + 1 for w in words)
    sentences = max(1, len(_SENTENCE.findall(text.strip() + " ")))
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


@functools.cache
def _hyphenator() -> Any:
    """pyphen's English dictionary, loaded once."""
    import pyphen

    return pyphen.Pyphen(lang="en_US")


def measures(table: pa.Table) -> dict[str, dict[str, float | None]]:
    """Per expert: verbosity (mean UTF-8 bytes of its sampled outputs) and readability (mean
    reading ease of the outputs that have words). Experts without outputs get None."""
    out: dict[str, dict[str, float | None]] = {}
    if "output" not in table.column_names:  # imported scores: nothing was generated here
        return out
    rows = table.filter(pc.is_valid(table["output"])).select(["expert", "output"]).to_pylist()
    by_expert: dict[str, list[str]] = {}
    for row in rows:
        by_expert.setdefault(row["expert"], []).append(row["output"])
    for expert in sorted(set(table["expert"].to_pylist())):
        outputs = by_expert.get(expert, [])
        ease = [e for e in map(reading_ease, outputs) if e is not None]
        out[expert] = {
            "verbosity": sum(len(o.encode()) for o in outputs) / len(outputs) if outputs else None,
            "readability": sum(ease) / len(ease) if ease else None,
        }
    return out


# --- the Ray Data worker -----------------------------------------------------------------


class ExpertScorer:
    """A Ray Data actor holding one expert: scores its batches and generates for the sample."""

    def __init__(
        self,
        name: str,
        model: str,
        task: str,
        new_tokens: int,
        load: Callable[[str, str], Any] | None = None,
    ):
        from serve_app.experts import load_expert

        self.name = name
        self.task = task
        self.new_tokens = new_tokens
        self.engine = (load or load_expert)(model, task)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch["text"].to_pylist()
        start = time.perf_counter()
        scores = self.engine.score(texts)
        per_row = (time.perf_counter() - start) / max(1, len(texts))
        outputs: list[str | None] = [None] * len(texts)
        wanted = [i for i, g in enumerate(batch["generate"].to_pylist()) if g]
        if wanted and self.task == "text-generation" and self.new_tokens > 0:
            openings = [texts[i][:OPENING_CHARS] for i in wanted]
            for i, gen in zip(wanted, self.engine.generate(openings, self.new_tokens), strict=True):
                outputs[i] = gen.text
        return pa.table(
            {
                "prompt_id": batch["prompt_id"],
                "text": batch["text"],
                "domain": batch["domain"],
                "expert": pa.array([self.name] * len(texts), pa.string()),
                "loss": pa.array([s.bpb for s in scores], pa.float64()),
                "bytes": pa.array([s.bytes for s in scores], pa.int64()),
                "tokens": pa.array([s.tokens for s in scores], pa.int64()),
                "seconds": pa.array([per_row] * len(texts), pa.float64()),
                "output": pa.array(outputs, pa.string()),
            },
            schema=PROFILE_SCHEMA,
        )


class PoolScorer:
    """A Ray Data actor for a long-tail pool: scores batches whose rows name their expert,
    loading each expert on first use and keeping the `slots` most recently used, as the
    pool's replicas do when serving. Hundreds of experts then share a few actors instead of
    one actor pool each."""

    def __init__(
        self,
        experts: dict[str, tuple[str, str]],
        slots: int,
        new_tokens: int,
        load: Callable[[str, str], Any] | None = None,
    ):
        from collections import OrderedDict

        self.experts = experts  # name -> (model, task)
        self.slots = slots
        self.new_tokens = new_tokens
        self.load = load
        self.held: OrderedDict[str, ExpertScorer] = OrderedDict()

    def _scorer(self, name: str) -> ExpertScorer:
        if name in self.held:
            self.held.move_to_end(name)
        else:
            if len(self.held) >= self.slots:
                self.held.popitem(last=False)  # the least recently used expert
            model, task = self.experts[name]
            self.held[name] = ExpertScorer(name, model, task, self.new_tokens, self.load)
        return self.held[name]

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch["expert"].to_pylist()
        parts = []
        for name in dict.fromkeys(names):  # rows come grouped by expert: a few groups a batch
            rows = pc.equal(batch["expert"], name)
            parts.append(self._scorer(name)(batch.filter(rows).drop_columns(["expert"])))
        return pa.concat_tables(parts)


# --- resuming ----------------------------------------------------------------------------


def fingerprint(model: str) -> str:
    """What identifies an expert's weights: its config and weight files' names, sizes and
    modification times for a local folder, else the Hub id."""
    folder = Path(model)
    if not folder.is_dir():
        return model
    h = hashlib.sha1()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".txt", ".model"):
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def expert_print(expert: ExpertConfig) -> str:
    """What a row measured on `expert` was measured with: its weights' fingerprint, and the
    revision where one is named (a Hub id alone does not pin the weights)."""
    return fingerprint(expert.model) + (f"@{expert.revision}" if expert.revision else "")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_profile(path: str | Path) -> pa.Table:
    """A profile table: measured (PROFILE_SCHEMA) or imported (serve_app.learn.scores), with
    its measure (serve_app.learn.matrix.Measure) in the schema's metadata."""
    from serve_app.learn.scores import SCORES_SCHEMA

    table = pq.read_table(path)
    meta = table.schema.metadata
    value = "score" if "score" in table.column_names else "loss"
    schema = PROFILE_SCHEMA if value == "loss" and "bytes" in table.column_names else None
    if schema is None:  # imported scores (or imported losses)
        schema = pa.schema([f.with_name(value) if f.name == "score" else f for f in SCORES_SCHEMA])
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise LibraryError(f"{path}: not a tryage profile; missing column(s) {', '.join(missing)}")
    return table.select(schema.names).cast(schema).replace_schema_metadata(meta)


def _done(out: Path, prints: dict[str, str], reuse: Sequence[Path] = ()) -> pa.Table:
    """Rows already measured with the current weights: those of the `reuse` profiles, the
    last output, then unfinished parts."""
    tables = []
    parts = _parts_dir(out)
    files = [Path(f) for f in reuse if Path(f).resolve() != out.resolve()]
    files += [out] if out.exists() else []
    files += sorted(parts.glob("*.parquet")) if parts.exists() else []
    for file in files:  # oldest first: other profiles, the last output, this run's parts
        table = pq.read_table(file)
        if not set(PROFILE_SCHEMA.names) <= set(table.column_names):
            continue  # imported scores: nothing measured here to reuse
        meta = json.loads((table.schema.metadata or {}).get(FINGERPRINTS, b"{}"))
        tables.append((table.select(PROFILE_SCHEMA.names).cast(PROFILE_SCHEMA), meta))
    kept = []
    for table, meta in tables:
        same = [name for name, fp in prints.items() if meta.get(name) == fp]
        kept.append(table.filter(pc.is_in(table["expert"], pa.array(same, pa.string()))))
    if not kept:
        return PROFILE_SCHEMA.empty_table()
    done = pa.concat_tables(kept)
    # One row per (prompt, expert): the latest wins (a rerun may add a sampled output).
    pairs = zip(done["prompt_id"].to_pylist(), done["expert"].to_pylist(), strict=True)
    latest = {key: i for i, key in enumerate(pairs)}
    # Typed indices: an empty list (no row measured with today's weights) is not an array of
    # integers to pyarrow, and `take` refuses it.
    return done.take(pa.array(sorted(latest.values()), pa.int64()))


# --- the job -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileConfig:
    """How a profile is measured."""

    generate: int = 32  # prompts (a seeded sample, the same for every expert) also generated
    new_tokens: int = 48  # tokens of each sampled generation (verbosity, readability)
    batch_size: int = 16  # prompts per scoring batch
    actors_per_expert: int = 1  # Ray Data actors per expert


@dataclass(frozen=True)
class ProfileRun:
    """A profile table and how much of it this run measured."""

    table: pa.Table
    measured: int  # (prompt, expert) rows measured by this run
    reused: int  # rows kept from earlier runs


def profile(
    experts: Sequence[ExpertConfig],
    prompts: list[Prompt],
    out: str | Path,
    cfg: ProfileConfig | None = None,
    *,
    progress: bool = True,
    load: Callable[[str, str], Any] | None = None,
    pools: dict[str, PoolConfig] | None = None,
    reuse: Sequence[Path] = (),
) -> ProfileRun:
    """Measure every expert on every prompt; write the profile table and return it.

    Experts of a long-tail pool (`pool: NAME`; `pools` gives their settings, the defaults
    otherwise) are measured by one actor pool per pool (PoolScorer, the pool's resources, as
    many actors as its max_replicas), the others by an actor pool each.

    `cfg.generate` prompts (a seeded sample, the same for every expert) also get a greedy
    continuation of `cfg.new_tokens` tokens from each text-generation expert, for verbosity
    and readability. `load` replaces the model loader (tests). Rows of the `reuse` profiles
    measured with the same weights are kept, not measured again.
    """
    from tqdm import tqdm

    from serve_app.session import ray_session

    cfg = cfg or ProfileConfig()
    generate, new_tokens, batch_size = cfg.generate, cfg.new_tokens, cfg.batch_size
    out = Path(out)
    prints = {e.name: expert_print(e) for e in experts}
    prompt_ids = {p.id for p in prompts}
    done = _done(out, prints, reuse)
    done = done.filter(pc.is_in(done["prompt_id"], pa.array(sorted(prompt_ids), pa.string())))
    cols = done.select(["prompt_id", "expert", "output"]).to_pydict()
    have = {(p, e): o is not None for p, e, o in zip(*cols.values(), strict=True)}
    sample = {p.id for p in sorted(prompts, key=lambda p: p.id)[: max(0, generate)]}
    base = prompts_table(prompts).append_column(
        "generate", pa.array([p.id in sample for p in prompts], pa.bool_())
    )

    todo = {}
    for expert in experts:
        writes = expert.task == "text-generation" and new_tokens > 0
        # Measure a row that is missing, or that now needs a sampled output it lacks.
        missing = [
            (p.id, expert.name) not in have
            or (writes and p.id in sample and not have[(p.id, expert.name)])
            for p in prompts
        ]
        if any(missing):
            todo[expert.name] = base.filter(pa.array(missing, pa.bool_()))
    total = sum(t.num_rows for t in todo.values())

    parts = _parts_dir(out)
    if total:
        # Ray only when something is left to measure (this Ray's, else a local one).
        with ray_session():
            import ray.data

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # one bar of our own, in rows
            # Memory per actor is the library's to set (resources.memory); no periodic advice.
            ctx.issue_detectors_config.detectors = []
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            # Nor its warning that its bars are off: ours replaces them.
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)

            def scored(
                rows: pa.Table,
                scorer: type,
                kwargs: dict,
                actors: int,
                owner: ExpertConfig | PoolConfig,
            ) -> Any:
                """`rows` streamed through an actor pool of `scorer`, with the resources of its
                owner (an expert, or a pool)."""
                return ray.data.from_arrow(_chunks(rows, batch_size * 4)).map_batches(
                    scorer,
                    fn_constructor_kwargs={**kwargs, "new_tokens": new_tokens, "load": load},
                    batch_size=batch_size,
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=actors),
                    udf_modifying_row_count=False,
                    **_data_resources(owner.resources),
                )

            datasets = []
            pooled: dict[str, list[ExpertConfig]] = {}
            for expert in experts:
                if expert.name not in todo:
                    continue
                if expert.pool is not None:
                    pooled.setdefault(expert.pool, []).append(expert)
                    continue
                kwargs = {"name": expert.name, "model": expert.model, "task": expert.task}
                datasets.append(
                    scored(todo[expert.name], ExpertScorer, kwargs, cfg.actors_per_expert, expert)
                )
            for name, members in pooled.items():
                pool = (pools or {}).get(name) or PoolConfig()
                rows = pa.concat_tables(
                    todo[e.name].append_column(
                        "expert", pa.array([e.name] * todo[e.name].num_rows, pa.string())
                    )
                    for e in members
                )
                kwargs = {
                    "experts": {e.name: (e.model, e.task) for e in members},
                    "slots": pool.max_models_per_replica,
                }
                actors = min(pool.autoscaling["max_replicas"], len(members))
                datasets.append(scored(rows, PoolScorer, kwargs, actors, pool))
            job = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
            parts.mkdir(parents=True, exist_ok=True)
            n = len(list(parts.glob("*.parquet")))
            meta = {FINGERPRINTS: json.dumps(prints).encode()}
            left = Counter({name: rows.num_rows for name, rows in todo.items()})
            with tqdm(total=total, desc="profile", unit="row", disable=not progress) as bar:
                bar.set_postfix_str(_waiting(left))
                for batch in job.iter_batches(batch_size=None, batch_format="pyarrow"):
                    batch = batch.select(PROFILE_SCHEMA.names).cast(PROFILE_SCHEMA)
                    pq.write_table(batch.replace_schema_metadata(meta), parts / f"{n:06d}.parquet")
                    n += 1
                    left.subtract(batch["expert"].to_pylist())
                    bar.set_postfix_str(_waiting(left), refresh=False)
                    bar.update(batch.num_rows)

    table = _done(out, prints, reuse) if total else done
    table = table.filter(pc.is_in(table["prompt_id"], pa.array(sorted(prompt_ids), pa.string())))
    # A reused row keeps its loss; its domain is this data's (a prompt is its text alone).
    domains = {p.id: p.domain for p in prompts}
    domain = pa.array([domains[i] for i in table["prompt_id"].to_pylist()], pa.string())
    table = table.set_column(table.schema.get_field_index("domain"), "domain", domain)
    table = table.sort_by([("prompt_id", "ascending"), ("expert", "ascending")])
    table = table.replace_schema_metadata({FINGERPRINTS: json.dumps(prints).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    if parts.exists():
        for part in parts.glob("*.parquet"):
            part.unlink()
        parts.rmdir()
    return ProfileRun(table, measured=total, reused=table.num_rows - total)


def _waiting(left: Counter) -> str:
    """The experts with rows still to measure, most first (the progress bar's postfix): where
    the bar slows, which expert it waits for."""
    waiting = [(name, n) for name, n in left.most_common() if n > 0]
    if not waiting:
        return ""
    shown = ", ".join(f"{name} {n}" for name, n in waiting[:3])
    return f"left: {shown}" + (f" and {len(waiting) - 3} more" if len(waiting) > 3 else "")


def _chunks(table: pa.Table, rows: int) -> list[pa.Table]:
    """Blocks of `rows` rows, so the pools stream instead of waiting on one block."""
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


def _data_resources(resources: dict[str, Any]) -> dict[str, Any]:
    """An expert's Ray actor options as map_batches takes them (CPU and GPU counts, memory,
    custom resources, accelerator type); defaults to one CPU like any Ray actor."""
    keys = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")
    out = {k: resources[k] for k in keys if k in resources}
    out.setdefault("num_cpus", 1)
    return out
