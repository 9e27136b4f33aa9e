"""Routing a data path offline: `tryage route`.

Every row of the data (in file order, duplicates kept) gets the decision the service would
make: the served router's own predictions (serve_app.router.LearnedRouter, in batches), the
library's objective and policy (serve_app.objective.plan and rank), prompt flags included.
One output row per input row, in order:

    {"text", "domain", "expert",
     "ranking": [{"expert", "predicted_loss", "penalty", "score", "penalties"}]}

the ranking as /v1/route answers it (`penalties`: the weighted terms `penalty` sums). For a
router trained on scores (higher is better; `tryage scores import`), `predicted_loss` is the
negated score the objective minimises, and each entry also has `predicted_score`. A row the
service would refuse (an unknown flag, say) gets `"expert": null`, `"ranking": null` and
`"error"`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app import objective
from serve_app.answers import has_mask
from serve_app.config import LibraryConfig
from serve_app.errors import BadRequest, TryageError
from serve_app.learn.data import read_rows

if TYPE_CHECKING:  # the ingress checks prompts here and loads no model: no torch at import
    from serve_app.learn.matrix import Measure
    from serve_app.router import Router


@dataclass
class Routed:
    """What a run routed, and how fast."""

    rows: int
    errors: int
    seconds: float  # wall time of the predictions and the objective
    chosen: dict[str, int]  # rows per chosen expert

    @property
    def ms_per_prompt(self) -> float:
        return 1000 * self.seconds / max(1, self.rows)


def _batches(rows: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_prompt(library: LibraryConfig, prompt: str) -> tuple[str, dict[str, float]]:
    """The prompt without its flags, and the weights they set; refused (BadRequest) where the
    service refuses it: empty, over ingress.max_prompt_chars, or only flags."""
    if not prompt.strip():
        raise BadRequest("prompt is empty", "prompt")
    limit = library.ingress.max_prompt_chars
    if len(prompt) > limit:
        raise BadRequest(f"prompt has {len(prompt)} characters; the limit is {limit}", "prompt")
    if not library.policy.prompt_flags:
        return prompt, {}
    clean, flags = objective.parse_flags(prompt)
    if not clean.strip():
        raise BadRequest("prompt is empty once its [flag: ...] markers are removed", "prompt")
    return clean, flags


def decide(
    library: LibraryConfig,
    router: Router,
    rows: list[tuple[str, str]],
    weights: dict[str, float] | None = None,
    allow: list[str] | None = None,
    task: str | None = None,
    measure: Measure | None = None,
) -> list[dict]:
    """The decisions for one batch of (text, domain) rows, as output rows; `measure` is what
    the router predicts (checkpoint_measure)."""
    penalties = objective.penalties(library.experts)
    out: list[dict | None] = [None] * len(rows)
    todo: list[tuple[int, str, list[str], dict[str, float]]] = []
    for i, (text, domain) in enumerate(rows):
        try:
            clean, flags = check_prompt(library, text)
            names, merged = objective.plan(library, flags, weights, allow, task, has_mask(text))
            todo.append((i, clean, names, merged))
        except TryageError as err:
            out[i] = {
                "text": text,
                "domain": domain,
                "expert": None,
                "ranking": None,
                "error": str(err),
            }
    predicted = router.predict([t for _, t, _, _ in todo]) if todo else []
    for (i, _, names, merged), pred in zip(todo, predicted, strict=True):
        ranking = objective.rank(pred, penalties, merged, names)
        text, domain = rows[i]
        out[i] = {
            "text": text,
            "domain": domain,
            "expert": ranking[0].expert,
            "ranking": [_entry(r, penalties, merged, measure) for r in ranking],
        }
    return [r for r in out if r is not None]


def _entry(
    r: objective.Ranked, penalties: dict, weights: dict[str, float], measure: Measure | None
) -> dict:
    entry = {**r.as_dict(), "penalties": objective.weighted_penalties(r.expert, penalties, weights)}
    if measure is not None and measure.higher_is_better:
        entry["predicted_score"] = measure.shown(r.predicted_loss)
    return entry


def route_data(
    library: LibraryConfig,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 64,
    weights: dict[str, float] | None = None,
    allow: list[str] | None = None,
    task: str | None = None,
    router: Router | None = None,
) -> Routed:
    """Route every row of `data`; write the decisions to `out` (JSONL, written beside it and
    renamed into place)."""
    from tqdm import tqdm

    from serve_app.learn.matrix import checkpoint_measure
    from serve_app.router import LearnedRouter

    router = router or LearnedRouter(
        library.router.model, library.router.checkpoint, revision=library.router.revision
    )
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    measure = checkpoint_measure(library.router.checkpoint)
    routed = Routed(0, 0, 0.0, {})
    with tmp.open("w", encoding="utf-8") as f:
        for batch in tqdm(_batches(read_rows(data), batch_size), desc="route", unit="batch"):
            start = time.perf_counter()
            decided = decide(library, router, batch, weights, allow, task, measure)
            routed.seconds += time.perf_counter() - start
            for row in decided:
                routed.rows += 1
                if row["expert"] is None:
                    routed.errors += 1
                else:
                    routed.chosen[row["expert"]] = routed.chosen.get(row["expert"], 0) + 1
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return routed
