"""Prompts and the request mix of the load test. Pure: no Locust, no Ray, no network.

Prompts come from a data PATH (`.jsonl` or `.parquet` rows with `text` and optional `domain`,
or a directory of them; a row without `domain` takes its file's parent folder's name), read
by the project's data loader, `serve_app.learn.data`. The default is `../shared/corpora` when it
exists, else real text every Python has: docstrings and source of standard-library modules,
grouped into a few domains. Nothing is copied into the repository.

The mix sends each prompt as one of several request kinds (plain routing with objective
weights, paper-style flags, expert allow-lists, fill-mask, /v1/route, the OpenAI endpoints),
each reported under its own Locust name.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.learn import data

#: Where the prompts come from when no data path is given; else the standard-library corpus.
SHARED_CORPORA = data.SHARED_CORPORA
STDLIB_DOMAINS = data.STDLIB_DOMAINS

#: Objective weights a request may carry; {} keeps the library's defaults.
WEIGHT_PRESETS: tuple[dict[str, float], ...] = (
    {},
    {"size": 0.5},
    {"size": 2.0},
    {"recency": 1.0},
    {"security": 1.0},
    {"size": 0.3, "recency": 0.3},
)
#: Paper-style flags written into the prompt.
FLAGS = ("[flag: smallest]", "[flag: newest]", "[flag: trusted]", "[flag: size=0.3]")
#: Request kinds and their share of the mix.
KINDS: dict[str, float] = {
    "infer": 0.30,
    "infer-flag": 0.15,
    "infer-experts": 0.15,
    "infer-mask": 0.05,
    "route": 0.15,
    "chat": 0.15,
    "completion": 0.05,
}
#: Locust names of the kinds.
NAMES: dict[str, str] = {
    "infer": "/v1/infer",
    "infer-flag": "/v1/infer [flag]",
    "infer-experts": "/v1/infer [experts]",
    "infer-mask": "/v1/infer [mask]",
    "route": "/v1/route",
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
}
#: Rejected requests are reported under their kind's name plus this suffix.
REJECTED = " [rejected]"
#: /v1/infer answers given by an expert below the first of the ranking (the ones above it
#: were busy or failed: the answer's `skipped`) are reported under the name plus this suffix.
REROUTED = " [rerouted]"

#: A data path that cannot be read (the project's data loader's error; it names the file).
DataError = data.DataError


#: One prompt: the project's own (id, text, domain).
Prompt = data.Prompt


@dataclass(frozen=True)
class Expert:
    """What the mix needs to know of an expert (from GET /v1/models)."""

    name: str
    task: str


@dataclass(frozen=True)
class RequestSpec:
    """One HTTP request of the mix: POST `path` with `body`, reported as `name`."""

    kind: str
    path: str
    body: dict[str, Any] = field(hash=False)

    @property
    def name(self) -> str:
        """The name Locust reports it under: the path, and the kind where paths are shared."""
        return NAMES[self.kind]


# --- prompts ---------------------------------------------------------------------------------


def default_data_path() -> Path | None:
    """`../shared/corpora` when it exists, else None (use the standard-library corpus)."""
    return SHARED_CORPORA if SHARED_CORPORA.is_dir() else None


def sample_prompts(
    path: str | Path | None, per_domain: int = 200, max_chars: int = 800, seed: int = 0
) -> list[Prompt]:
    """A seeded sample of up to `per_domain` prompts per domain under `path`, cut to `max_chars`.

    Files are read by the project's data loader (`serve_app.learn.data.load_prompts`: the same
    rules, ids and seeded order as profiling and evaluation). `path` None reads the
    standard-library corpus, shuffled with `seed`.
    """
    if path is None:
        found = data.stdlib_prompts()
        random.Random(seed).shuffle(found)
    else:
        found = data.load_prompts(path, per_domain=per_domain, seed=seed)
    found = [Prompt.of(data.cut_text(p.text, max_chars), p.domain) for p in found if p.text.strip()]
    if not found:
        raise DataError(f"no prompts with text under {path}")
    return found


def domains(prompts: list[Prompt]) -> dict[str, int]:
    """Prompt count per domain."""
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.domain] = counts.get(p.domain, 0) + 1
    return dict(sorted(counts.items()))


# --- the request mix -------------------------------------------------------------------------


def make_request(rng: random.Random, prompt: Prompt, experts: list[Expert]) -> RequestSpec:
    """One request of the mix for `prompt`, its kind drawn with the shares of KINDS."""
    kinds = list(KINDS)
    if not any(e.task == "fill-mask" for e in experts):
        kinds.remove("infer-mask")
    kind = rng.choices(kinds, weights=[KINDS[k] for k in kinds])[0]
    generators = [e.name for e in experts if e.task == "text-generation"]
    text = prompt.text
    tokens = rng.randint(4, 16)
    weights = rng.choice(WEIGHT_PRESETS)
    if kind == "infer":
        return RequestSpec(kind, "/v1/infer", _infer(text, tokens, weights=weights))
    if kind == "infer-flag":
        return RequestSpec(kind, "/v1/infer", _infer(f"{rng.choice(FLAGS)} {text}", tokens))
    if kind == "infer-experts":
        allow = rng.sample(generators, k=min(len(generators), rng.randint(1, 2)))
        return RequestSpec(kind, "/v1/infer", _infer(text, tokens, experts=allow))
    if kind == "infer-mask":
        allow = [e.name for e in experts if e.task == "fill-mask"]
        body = _infer(mask_word(rng, text), tokens, experts=allow)
        return RequestSpec(kind, "/v1/infer", {**body, "top_k": 3})
    if kind == "route":
        return RequestSpec(kind, "/v1/route", {"prompt": text, "weights": weights})
    if kind == "chat":
        body = {
            "model": "tryage",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": text},
            ],
            "max_tokens": tokens,
            "tryage": {"weights": weights},
        }
        return RequestSpec(kind, "/v1/chat/completions", body)
    body = {"model": rng.choice(generators), "prompt": text, "max_tokens": tokens}
    return RequestSpec(kind, "/v1/completions", body)


def _infer(prompt: str, tokens: int, **options: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_new_tokens": tokens, **options}


_WORD = re.compile(r"\b[A-Za-z]{3,}\b")


def mask_word(rng: random.Random, text: str) -> str:
    """`text` with one word replaced by [MASK] (appended where it has no word)."""
    words = list(_WORD.finditer(text))
    if not words:
        return f"{text} [MASK]"
    w = rng.choice(words)
    return f"{text[: w.start()]}[MASK]{text[w.end() :]}"


def experts_from_models(models: Mapping[str, Any]) -> list[Expert]:
    """The experts of a GET /v1/models answer."""
    return [Expert(m["id"], m.get("task", "text-generation")) for m in models["data"]]


# --- outcomes --------------------------------------------------------------------------------


def outcome(status: int, headers: Mapping[str, str], body: Any = None) -> str:
    """'ok', 'rejected' (deliberate backpressure) or 'failure'; `body`: the answer's JSON.

    Shedding load as configured is counted apart: Serve's own 503 (or 429) with Retry-After
    when a deployment's max_queued_requests is full (its body is not tryage's error shape),
    and tryage's `overloaded_error`. Every other answer that is not 2xx is a failure, tryage's
    503 `no_expert_available` included: it carries Retry-After too, but it says the experts
    failed or the deadline passed, not that the service chose to shed load.
    """
    if 200 <= status < 300:
        return "ok"
    retry_after = any(k.lower() == "retry-after" for k in headers)
    if status not in (429, 503) or not retry_after:
        return "failure"
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):  # tryage's error shape: only overloaded_error is shedding
        return "rejected" if error.get("type") == "overloaded_error" else "failure"
    return "rejected"


def rerouted(body: Any) -> bool:
    """Whether a /v1/infer answer came from an expert below the first of its ranking."""
    return isinstance(body, Mapping) and bool(body.get("skipped"))
