"""Importing per-prompt, per-model scores that someone else measured: `tryage scores import`.

A public routing benchmark (RouterDC, RouterBench) or a user's own evaluation gives, for each
prompt, how well each model did on it. Imported, that becomes a profile of scores (higher is
better; serve_app.learn.matrix.Measure) and a routing library whose experts have no local
weights: `engine: openai` entries naming the model, to point at a server that serves it
(vLLM, TGI, a hosted API) once one runs. `tryage train` then trains the router on the profile
like on any other; a score that was never measured stays missing (never zero).

Formats (the task or file name becomes the domain):

routerdc     RouterDC's JSON: one list per file of {"question", "scores": {model: float}}.
             What a score counts follows RouterDC's own evaluation: on multiple-choice tasks
             a model answered correctly exactly when its score is > 0 (counts 1, else 0); on
             generation tasks (a file named after gsm8k or humaneval) the score is the share
             of sampled answers that were correct and counts as it is. The measure: accuracy.
routerbench  RouterBench's CSV: sample_id, prompt, eval_name, one score column per model,
             `<model>|model_response`, `<model>|total_cost`. Empty cells are missing; costs
             are kept per prompt. The measure: score.
jsonl        one row per (prompt, model): {"text", "model", "score", "cost"?, "domain"?}; a
             row without domain takes its file's name. The measure: score (or a loss, with
             `lower_is_better`).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from serve_app.config import MINILM, write_library
from serve_app.learn.data import DataError, jsonl_rows, prompt_id
from serve_app.learn.matrix import MEASURE_KEY, Measure

FORMATS = ("routerdc", "routerbench", "jsonl")
#: RouterDC's generation tasks: a score is the share of correct samples, not a probability.
ROUTERDC_SHARE_TASKS = ("gsm8k", "humaneval")
#: An imported profile: the columns of a measured one that mean something for imported scores.
SCORES_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("expert", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),  # the name the source gave the model
        pa.field("score", pa.float64()),  # null: not measured
        pa.field("cost", pa.float64()),  # what the answer cost (a currency), null: unknown
    ]
)


@dataclass(frozen=True)
class Row:
    """One imported (prompt, model) measurement; `where` says where it was read."""

    text: str
    domain: str
    model: str
    score: float | None
    cost: float | None = None
    where: str = ""


def _number(value: object, where: str, cost: bool = False) -> float | None:
    """A score or cost cell: a finite number (a cost not negative), or None where empty or
    NaN (missing)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a number") from None
    except OverflowError:  # a JSON integer of hundreds of digits
        raise DataError(f"{where}: {str(value)[:20]}... is not a finite number") from None
    if math.isnan(x):
        return None
    if math.isinf(x):
        raise DataError(f"{where}: {value!r} is not a finite number")
    if cost and x < 0:
        raise DataError(f"{where}: a cost cannot be negative ({value!r})")
    return x


def _json_number(value: object, where: str, cost: bool = False) -> float | None:
    """A JSON score or cost: a number, or null (or left out) for missing. A string or a
    boolean is refused, not read as a number: `"0.3"` or `true` is most likely a mistake."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise DataError(f"{where}: {json.dumps(value)} is not a JSON number (null for missing)")
    if isinstance(value, float) and math.isnan(value):  # Python's json reads NaN; JSON has none
        raise DataError(f"{where}: NaN is not JSON; null says a value is missing")
    return _number(value, where, cost)


def read_routerdc(path: Path) -> Iterator[Row]:
    """Rows of one RouterDC JSON file (see the module docstring for what a score counts)."""
    task = path.stem
    share = any(name in task.lower() for name in ROUTERDC_SHARE_TASKS)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{question, scores}} rows")
    for n, row in enumerate(data):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{path}[{n}]: a row needs a string 'question'")
        scores = row.get("scores")
        if not isinstance(scores, dict) or not scores:
            raise DataError(f"{path}[{n}]: a row needs a 'scores' mapping of model to score")
        for model, raw in scores.items():
            value = _number(raw, f"{path}[{n}].scores.{model}")
            if value is not None and not share:
                value = 1.0 if value > 0 else 0.0
            yield Row(row["question"], task, str(model), value, where=f"{path}[{n}]")


def read_routerbench(path: Path) -> Iterator[Row]:
    """Rows of one RouterBench CSV file."""
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        need = [c for c in ("prompt", "eval_name") if c not in fields]
        if need:
            raise DataError(f"{path}: not a RouterBench CSV; no column(s) {', '.join(need)}")
        skip = {"sample_id", "prompt", "eval_name", "oracle_model_to_route_to"}
        models = [c for c in fields if c not in skip and "|" not in c]
        if not models:
            raise DataError(f"{path}: no model score columns")
        for n, row in enumerate(reader, 2):
            for model in models:
                yield Row(
                    row["prompt"],
                    row["eval_name"] or path.stem,
                    model,
                    _number(row.get(model), f"{path}:{n}: {model}"),
                    _number(
                        row.get(f"{model}|total_cost"), f"{path}:{n}: {model}|total_cost", True
                    ),
                    f"{path}:{n}",
                )


def read_jsonl(path: Path) -> Iterator[Row]:
    """Rows of one plain JSONL file."""
    for n, row in jsonl_rows(path):
        where = f"{path}:{n}"
        if not isinstance(row.get("model"), str) or not row["model"]:
            raise DataError(f"{where}: a row needs a string 'model'")
        if not row["text"].strip():
            raise DataError(f"{where}: 'text' is empty")
        if "score" not in row:  # a misspelt key would otherwise read as a missing score
            raise DataError(f"{where}: a row needs a 'score' (null where it is missing)")
        if not isinstance(row.get("domain") or "", str):
            raise DataError(f"{where}: 'domain' must be a string")
        yield Row(
            row["text"],
            str(row.get("domain") or path.stem),
            row["model"],
            _json_number(row.get("score"), f"{where}: score"),
            _json_number(row.get("cost"), f"{where}: cost", cost=True),
            where,
        )


READERS = {"routerdc": read_routerdc, "routerbench": read_routerbench, "jsonl": read_jsonl}


def expert_name(model: str, taken: set[str]) -> str:
    """A library name ([a-z0-9-]+, unique) for a model: its last path part, lower-cased."""
    base = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-") or "model"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


@dataclass
class Imported:
    """What an import wrote, and a summary of it."""

    profile: Path
    library: Path
    measure: Measure
    prompts: int
    experts: dict[str, str]  # library name -> model
    missing: int  # (prompt, model) pairs without a score
    domains: dict[str, int]  # prompts per domain
    repeated: int = 0  # (prompt, model) pairs read more than once: the last one kept
    missing_costs: int = 0  # scored (prompt, model) pairs without a cost, where any has one

    def table(self) -> str:
        lines = [
            f"imported {self.prompts} prompts x {len(self.experts)} models "
            f"({self.measure.name}, {self.measure.direction}); "
            f"{self.missing} missing score(s) kept missing"
            + (
                f"; {self.repeated} repeated (prompt, model) pair(s), the last one kept"
                if self.repeated
                else ""
            ),
            *(
                [f"{self.missing_costs} scored pair(s) without a cost, kept missing"]
                if self.missing_costs
                else []
            ),
            "domains: " + ", ".join(f"{d} {n}" for d, n in self.domains.items()),
            "experts: " + ", ".join(f"{n} ({m})" for n, m in self.experts.items()),
            f"wrote {self.profile} and {self.library}",
        ]
        return "\n".join(lines)


def import_scores(
    fmt: str,
    paths: Iterable[str | Path],
    out: str | Path,
    *,
    base_url: str = "http://127.0.0.1:8001/v1",
    lower_is_better: bool = False,
    released: dt.date | None = None,
) -> Imported:
    """Read `paths` in format `fmt`; write OUT/profile.parquet and OUT/library.yaml.

    The library's experts are `engine: openai` entries at `base_url` (edit it to where each
    model is served); its router is the packaged encoder with a checkpoint at OUT/router,
    which `tryage train --library OUT/library.yaml --profile OUT/profile.parquet` writes.
    """
    if fmt not in READERS:
        raise DataError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise DataError(f"no file at {f}")
    if lower_is_better and fmt != "jsonl":
        raise DataError(
            f"{fmt} files hold scores (higher is better); --lower-is-better is for jsonl"
        )
    if fmt == "routerdc":
        measure = Measure("accuracy", True)
    else:
        measure = Measure("loss", False) if lower_is_better else Measure("score", True)
    # One value per (prompt, model). A benchmark's repeated pair (RouterDC repeats a few
    # questions) keeps its last measurement, counted; in a JSONL file of one's own, a pair
    # measured twice with different values is refused: which one is meant is not ours to guess.
    cells: dict[tuple[str, str], Row] = {}
    texts: dict[str, Row] = {}
    repeated = 0
    for f in files:
        for row in READERS[fmt](f):
            pid = prompt_id(row.text)
            texts.setdefault(pid, row)
            old = cells.get((pid, row.model))
            if old is not None:
                repeated += 1
                if fmt == "jsonl" and (old.score, old.cost) != (row.score, row.cost):
                    raise DataError(
                        f"{row.where}: {row.model!r} on this text was already measured at "
                        f"{old.where} (score {old.score}, cost {old.cost}); one measurement "
                        "per (text, model)"
                    )
            cells[(pid, row.model)] = row
    if not cells:
        raise DataError(f"no rows in {', '.join(map(str, files))}")
    models = sorted({m for _, m in cells})
    taken: set[str] = set()
    names = {m: expert_name(m, taken) for m in models}
    pids = sorted(texts)
    columns: dict[str, list] = {f.name: [] for f in SCORES_SCHEMA}
    missing = 0
    for pid in pids:
        first = texts[pid]
        for m in models:
            cell = cells.get((pid, m))
            value = None if cell is None else cell.score
            missing += value is None
            columns["prompt_id"].append(pid)
            columns["text"].append(first.text)
            columns["domain"].append(first.domain)
            columns["expert"].append(names[m])
            columns["model"].append(m)
            columns["score"].append(value)
            columns["cost"].append(None if cell is None else cell.cost)
    schema = SCORES_SCHEMA
    if not measure.higher_is_better:  # a loss profile names its column `loss`
        schema = pa.schema([f.with_name("loss") if f.name == "score" else f for f in schema])
        columns["loss"] = columns.pop("score")
    schema = schema.with_metadata({MEASURE_KEY: json.dumps(measure.as_json()).encode()})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns, schema=schema)
    profile = out / "profile.parquet"
    tmp = profile.with_name(profile.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(profile)
    library = write_library(
        out / "library.yaml",
        library_dict(names, table, measure, base_url, released or dt.date.today()),
        header=(
            f"# Imported by tryage scores import --format {fmt}: {measure.name} of "
            f"{len(models)} models on {len(pids)} prompts ({measure.direction}).\n"
            "# The experts are served elsewhere: set each base_url to a server of its model.\n"
            "# released is the import date: set each model's own for the recency weight.\n"
            "# Train the router: tryage train --library THIS --profile profile.parquet\n"
        ),
    )
    domains: dict[str, int] = {}
    for pid in pids:
        domains[texts[pid].domain] = domains.get(texts[pid].domain, 0) + 1
    return Imported(
        profile,
        library,
        measure,
        len(pids),
        {v: k for k, v in names.items()},
        missing,
        dict(sorted(domains.items())),
        repeated,
        _missing_costs(columns),
    )


def _missing_costs(columns: dict[str, list]) -> int:
    """Scored cells without a cost, in a profile where some cell has one (0 where none has:
    a source that measured no costs is not missing them)."""
    values = columns.get("score", columns.get("loss", []))
    costs = columns["cost"]
    if all(c is None for c in costs):
        return 0
    return sum(v is not None and c is None for v, c in zip(values, costs, strict=True))


def library_dict(
    names: dict[str, str], table: pa.Table, measure: Measure, base_url: str, released: dt.date
) -> dict:
    """The routing library of an import: one remote expert per model, a price where the
    profile has costs (the mean cost of a prompt's answer, expressed per million prompt bytes
    of the prompts it answered, as input_per_mtok: the cost penalty ranks experts by it)."""
    rows = table.select(["expert", "text", "cost"]).to_pylist()
    spent: dict[str, list[float]] = {}
    for r in rows:
        if r["cost"] is not None:
            acc = spent.setdefault(r["expert"], [0.0, 0.0])
            acc[0] += r["cost"]
            acc[1] += len(r["text"].encode())
    experts = []
    for model, name in names.items():
        entry: dict = {
            "name": name,
            "model": model,
            "task": "text-generation",
            "engine": "openai",
            "base_url": base_url,
            "released": released.isoformat(),
            "description": f"{model} ({measure.name} imported per prompt)",
        }
        if name in spent and spent[name][1] > 0:
            entry["price"] = {"input_per_mtok": round(spent[name][0] / spent[name][1] * 1e6, 6)}
        experts.append(entry)
    return {"router": {"model": MINILM, "checkpoint": "router"}, "experts": experts}
