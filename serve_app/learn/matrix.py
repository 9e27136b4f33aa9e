"""The profile as a matrix (prompts x experts), and the reference file a checkpoint keeps.

`pivot` turns a profile table (serve_app.learn.profile) into one row per prompt with every
expert's loss. A profile holds either losses (lower is better: bits per byte, as `tryage
profile` measures) or scores someone else measured (higher is better: accuracy, as `tryage
scores import` reads); its `Measure` says which. The matrix always holds losses, a score
negated, so training, routing and the objective have one direction; `Measure.shown` turns a
loss back into the profile's own number for reports. A score that was never measured is
missing (NaN), not zero: training and evaluation skip it.

`reference.safetensors`, written beside the router's head by `tryage train`, holds the
training prompts' embeddings and losses: the knn and best_single baselines read it, and
evaluation uses its prompt ids to leave out what the router was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from serve_app.config import REFERENCE, LibraryError

#: Parquet metadata key of a profile: its Measure as JSON.
MEASURE_KEY = b"tryage.measure"


@dataclass(frozen=True)
class Measure:
    """What a profile's numbers are: a loss (lower is better) or a score (higher is better)."""

    name: str = "bits/byte"
    higher_is_better: bool = False

    @property
    def column(self) -> str:
        """The profile's column holding the numbers."""
        return "score" if self.higher_is_better else "loss"

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    def shown(self, loss: float) -> float:
        """A loss of the matrix as the profile's own number (a score is un-negated)."""
        return -loss if self.higher_is_better else loss

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better}


#: The measure of `tryage profile`: bits per UTF-8 byte of the prompt under the expert.
BITS_PER_BYTE = Measure()


def measure_of(table: pa.Table) -> Measure:
    """The Measure a profile table declares (a table without one holds bits per byte)."""
    raw = (table.schema.metadata or {}).get(MEASURE_KEY)
    if raw:
        return Measure(**json.loads(raw))
    return Measure("score", True) if "score" in table.column_names else BITS_PER_BYTE


@dataclass
class Matrix:
    """A profile pivoted to one row per prompt with every expert's loss."""

    ids: list[str]
    texts: list[str]
    domains: list[str]
    experts: list[str]
    losses: np.ndarray  # (N, E) losses (a score negated); NaN where not measured
    measure: Measure = BITS_PER_BYTE
    costs: np.ndarray | None = None  # (N, E) what each answer cost, where the profile says

    def subset(self, keep: np.ndarray) -> Matrix:
        idx = np.flatnonzero(keep)
        return Matrix(
            [self.ids[i] for i in idx],
            [self.texts[i] for i in idx],
            [self.domains[i] for i in idx],
            self.experts,
            self.losses[idx],
            self.measure,
            None if self.costs is None else self.costs[idx],
        )


def pivot(table: pa.Table, experts: list[str], complete: bool = True) -> Matrix:
    """Prompts measured on `experts`, in prompt-id order: on every one of them, or with
    `complete=False` on at least one (the others NaN: imported scores have gaps)."""
    measure = measure_of(table)
    names = ["prompt_id", "text", "domain", "expert", measure.column]
    has_cost = "cost" in table.column_names
    cols = table.select(names + (["cost"] if has_cost else [])).to_pydict()
    rows: dict[str, dict[str, Any]] = {}
    for i, (pid, text, domain, expert, value) in enumerate(
        zip(*(cols[n] for n in names), strict=True)
    ):
        row = rows.setdefault(pid, {"text": text, "domain": domain, "loss": {}, "cost": {}})
        if value is not None and not np.isnan(value):
            row["loss"][expert] = -value if measure.higher_is_better else value
        if has_cost and cols["cost"][i] is not None:
            row["cost"][expert] = cols["cost"][i]
    missing = [e for e in experts if not any(e in r["loss"] for r in rows.values())]
    if missing:
        raise LibraryError(
            f"the profile has no {measure.column} for expert(s) {', '.join(missing)}; "
            "run tryage profile with this library"
        )
    enough = len(experts) if complete else 1
    ids = sorted(pid for pid, r in rows.items() if sum(e in r["loss"] for e in experts) >= enough)
    nan = float("nan")
    return Matrix(
        ids=ids,
        texts=[rows[i]["text"] for i in ids],
        domains=[rows[i]["domain"] for i in ids],
        experts=list(experts),
        losses=np.array(
            [[rows[i]["loss"].get(e, nan) for e in experts] for i in ids], dtype=np.float64
        ).reshape(len(ids), len(experts)),
        measure=measure,
        costs=np.array(
            [[rows[i]["cost"].get(e, nan) for e in experts] for i in ids], dtype=np.float64
        ).reshape(len(ids), len(experts))
        if has_cost
        else None,
    )


def save_reference(folder: Path, emb: torch.Tensor, matrix: Matrix) -> None:
    """The profile's prompt embeddings (N, H) and losses (N, E) beside the head."""
    from safetensors.torch import save_file

    save_file(
        {
            "embeddings": emb.float().contiguous(),
            "losses": torch.tensor(matrix.losses, dtype=torch.float32),
        },
        str(folder / REFERENCE),
        metadata={"experts": json.dumps(matrix.experts), "prompt_ids": json.dumps(matrix.ids)},
    )


def checkpoint_measure(checkpoint: str | Path) -> Measure:
    """What the router of a checkpoint predicts: the measure of the profile it was trained on
    (its report.json), bits per byte where it says none (an untrained router)."""
    report = Path(checkpoint) / "report.json"
    if not report.is_file():
        return BITS_PER_BYTE
    return Measure(**json.loads(report.read_text()).get("measure", BITS_PER_BYTE.as_json()))


def trained_ids(checkpoint: Path) -> set[str]:
    """Ids of the prompts the router was trained on (empty for an untrained router)."""
    from safetensors import safe_open

    file = Path(checkpoint) / REFERENCE
    if not file.exists():
        return set()
    with safe_open(str(file), framework="pt") as f:
        return set(json.loads(f.metadata().get("prompt_ids", "[]")))


def load_reference(checkpoint: Path) -> tuple[list[str], Any, Any]:
    """Training prompts' embeddings (N, H) and losses (N, E) saved by `tryage train`."""
    from safetensors import safe_open

    file = Path(checkpoint) / REFERENCE
    if not file.exists():
        raise LibraryError(
            f"{checkpoint}: no {REFERENCE}; the knn and best_single baselines need a router "
            "trained with tryage train"
        )
    with safe_open(str(file), framework="pt") as f:
        experts = json.loads(f.metadata()["experts"])
        return experts, f.get_tensor("embeddings"), f.get_tensor("losses")
