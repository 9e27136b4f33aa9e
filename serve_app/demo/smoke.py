"""`tryage smoke-library OUT`: a tiny library with random weights, for smoke-testing a deployment.

Four experts of different sizes, release dates and trust (three causal LMs, one masked LM),
built with transformers from configs and saved as safetensors, and an untrained router head on
the packaged MiniLM encoder. The experts are random: this checks the machinery, not routing
quality.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import torch

from serve_app.config import MINILM, write_library
from serve_app.demo.lm import masked_tokenizer, train_tokenizer
from serve_app.files import readable
from serve_app.router import HeadConfig, RouterHead, save_head

#: name, task, width, layers, released, trusted, description
SMOKE_EXPERTS = [
    ("gen-xs", "text-generation", 32, 1, "2023-03-01", True, "Extra-small random causal LM."),
    ("gen-s", "text-generation", 64, 2, "2024-06-01", False, "Small random causal LM, untrusted."),
    ("gen-m", "text-generation", 128, 3, "2025-01-15", True, "Medium random causal LM."),
    ("mask-s", "fill-mask", 64, 2, "2024-01-10", True, "Small random masked LM for [MASK]."),
]


def _sample_text() -> list[str]:
    """A few kilobytes of text every Python has: the standard library's own source."""
    import argparse
    import json as json_module

    return [inspect.getsource(m) for m in (argparse, json_module, textwrap)]


def build_expert(task: str, vocab: int, width: int, layers: int, seed: int):
    """A randomly initialised causal (GPT-2) or masked (BERT) LM."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    heads = max(1, width // 32)
    if task == "text-generation":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=256,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
        return GPT2LMHeadModel(cfg)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=256,
        pad_token_id=1,
    )
    return BertForMaskedLM(cfg)


def laptop_library(experts: list[dict], router_resources: dict) -> dict:
    """A library mapping with a router on the packaged MiniLM (on CPUs one replica, two under
    load, one torch thread each; on a GPU one replica), its head in `router/`, short batching
    waits and no default weights (smoke and demo libraries)."""
    return {
        "router": {
            "model": MINILM,
            "checkpoint": "router",
            "resources": router_resources,
            # On CPUs a second replica takes the second core under load: two one-thread
            # replicas route 16 clients about 1.4x faster than one two-thread replica, and two
            # two-thread replicas on 2 cores collapse (OpenMP threads spinning for cores the
            # other holds: docs/benchmarks.md, Route latency). A lone prompt pays one thread's
            # speed. On a GPU one replica does, and leaves the other GPUs to the experts.
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}
            if router_resources.get("num_gpus")
            else {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 4,
                "upscale_delay_s": 2.0,
            },
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0},
            "threads": 1,
        },
        "experts": experts,
        "objective": {"weights": {"size": 0.0, "recency": 0.0}},
    }


def build_smoke_library(out: str | Path, *, gpus: bool = False, seed: int = 0) -> Path:
    """Write a tiny random library to `out/library.yaml`; returns that path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    causal_tok = train_tokenizer(_sample_text())
    masked_tok = masked_tokenizer(causal_tok)
    vocab = len(causal_tok)
    # On a CPU machine, fractions of a CPU let every replica fit on a laptop.
    expert_res = {"num_gpus": 1} if gpus else {"num_cpus": 0.25}
    experts = []
    for i, (name, task, width, layers, released, trusted, desc) in enumerate(SMOKE_EXPERTS):
        folder = out / "experts" / name
        build_expert(task, vocab, width, layers, seed + i).save_pretrained(
            folder, safe_serialization=True
        )
        (causal_tok if task == "text-generation" else masked_tok).save_pretrained(folder)
        readable(folder)  # safetensors writes 0600
        experts.append(
            {
                "name": name,
                "model": f"experts/{name}",
                "task": task,
                "released": released,
                "description": desc,
                "trusted": trusted,
                "resources": dict(expert_res),
            }
        )
    # The router is random too: a head around a plausible loss (log2 of the vocabulary per ~3
    # bytes). Train it on a profile (tryage profile, tryage train) to route for real.
    torch.manual_seed(seed)
    prior = float(torch.log2(torch.tensor(float(vocab))) / 3)
    names = [e["name"] for e in experts]
    save_head(
        RouterHead(HeadConfig(experts=names, target_mean=[prior] * len(names))), out / "router"
    )
    library = laptop_library(experts, {"num_gpus": 1} if gpus else {"num_cpus": 0.5})
    header = "# Smoke library written by `tryage smoke-library`: random weights, random router.\n"
    path = write_library(out / "library.yaml", library, header)
    (out / "README.md").write_text(
        "Smoke library: random experts and an untrained router, for testing a deployment.\n"
    )
    return path
