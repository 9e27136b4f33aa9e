"""The profile as a matrix (prompts x experts), and the reference file a checkpoint keeps.

`pivot` turns a profile table (serve_app.learn.profile) into one row per prompt with every
expert's loss. `reference.safetensors`, written beside the router's head by `tryage train`,
holds the training prompts' embeddings and losses: the knn and best_single baselines read
it, and evaluation uses its prompt ids to leave out what the router was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from serve_app.config import LibraryError

#: File in a router checkpoint holding the profile's prompt embeddings and losses.
REFERENCE = "reference.safetensors"


@dataclass
class Matrix:
    """A profile pivoted to one row per prompt with every expert's loss."""

    ids: list[str]
    texts: list[str]
    domains: list[str]
    experts: list[str]
    losses: np.ndarray  # (N, E) bits per byte

    def subset(self, keep: np.ndarray) -> Matrix:
        idx = np.flatnonzero(keep)
        return Matrix(
            [self.ids[i] for i in idx],
            [self.texts[i] for i in idx],
            [self.domains[i] for i in idx],
            self.experts,
            self.losses[idx],
        )


def pivot(table: pa.Table, experts: list[str]) -> Matrix:
    """Prompts measured on every one of `experts`, in prompt-id order."""
    rows: dict[str, dict[str, Any]] = {}
    cols = table.select(["prompt_id", "text", "domain", "expert", "loss"]).to_pydict()
    for pid, text, domain, expert, loss in zip(*cols.values(), strict=True):
        row = rows.setdefault(pid, {"text": text, "domain": domain, "loss": {}})
        row["loss"][expert] = loss
    missing = [e for e in experts if not any(e in r["loss"] for r in rows.values())]
    if missing:
        raise LibraryError(
            f"the profile has no rows for expert(s) {', '.join(missing)}; "
            "run tryage profile with this library"
        )
    ids = sorted(pid for pid, r in rows.items() if all(e in r["loss"] for e in experts))
    return Matrix(
        ids=ids,
        texts=[rows[i]["text"] for i in ids],
        domains=[rows[i]["domain"] for i in ids],
        experts=list(experts),
        losses=np.array([[rows[i]["loss"][e] for e in experts] for i in ids], dtype=np.float64),
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
