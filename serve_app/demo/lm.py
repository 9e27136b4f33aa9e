"""The demo's expert models: small GPT-2 causal LMs trained on domain text, on CPU, in minutes.

Read top to bottom: the model sizes, the token streams, the training loop. A model trains on
windows of `block` tokens. Half of them start at a document's beginning (the BOS token), because
that is how a prompt is scored: from its first byte, up to the context length. The other half
start anywhere, so that a small corpus still gives varied windows.
A generalist draws each window from a domain chosen uniformly at random, so a small domain is
not drowned by a large one; a specialist is the small generalist trained further on its own
domain only, as domain models are made in practice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelSize:
    """A GPT-2 shape."""

    width: int
    layers: int
    heads: int


@dataclass(frozen=True)
class LMConfig:
    """How every expert of one demo build is shaped and trained."""

    vocab_size: int = 2048
    block: int = 128  # context length: n_positions and training window
    small: ModelSize = ModelSize(width=128, layers=2, heads=4)
    large: ModelSize = ModelSize(width=192, layers=3, heads=4)
    batch_size: int = 24  # windows a step
    general_steps: int = 200  # each generalist
    special_steps: int = 80  # each specialist, from the small generalist
    lr: float = 3e-3  # the small generalist
    large_lr: float = 2e-3  # the larger generalist: larger models want a smaller step
    special_lr: float = 3e-3
    warmup: float = 0.1  # share of the steps with a linear warm-up; then cosine to lr / 10
    weight_decay: float = 0.1


def new_model(size: ModelSize, vocab_size: int, block: int, seed: int):
    """A randomly initialised GPT-2 LM; BOS = EOS = id 0, padding id 1 (the demo tokenizer's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block,
        n_embd=size.width,
        n_layer=size.layers,
        n_head=size.heads,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(cfg)


class Stream:
    """One domain's training documents as one token tensor, each document after a BOS."""

    def __init__(self, docs: list[list[int]], bos: int):
        ids: list[int] = []
        starts: list[int] = []
        for doc in docs:
            starts.append(len(ids))
            ids += [bos, *doc]
        self.ids = torch.tensor(ids, dtype=torch.long)  # (N,)
        self.starts = torch.tensor(starts, dtype=torch.long)  # (D,)

    def __len__(self) -> int:
        return len(self.ids)

    def window(self, start: int, length: int) -> torch.Tensor:
        """`length` tokens from position `start` on, running into the next documents (and
        wrapping round at the end)."""
        idx = (torch.arange(length) + start) % len(self.ids)
        return self.ids[idx]


def batch(
    streams: list[Stream], size: int, block: int, gen: torch.Generator, aligned: float = 0.5
) -> torch.Tensor:
    """(size, block + 1) windows: a domain uniformly at random, then a window that starts at
    one of its documents' BOS (with probability `aligned`: how prompts are scored) or anywhere
    in the stream (so a small corpus still gives varied windows)."""
    rows = []
    for _ in range(size):
        s = streams[int(torch.randint(len(streams), (1,), generator=gen))]
        if float(torch.rand((), generator=gen)) < aligned:
            start = int(s.starts[int(torch.randint(len(s.starts), (1,), generator=gen))])
        else:
            start = int(torch.randint(len(s), (1,), generator=gen))
        rows.append(s.window(start, block + 1))
    return torch.stack(rows)


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` share of the steps, then cosine down to lr / 10."""
    warm = max(1, int(steps * warmup))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_lm(
    model,
    streams: list[Stream],
    *,
    steps: int,
    lr: float,
    cfg: LMConfig,
    seed: int,
    desc: str = "training",
    progress: bool = True,
) -> list[float]:
    """Train `model` in place for `steps` steps on windows of `streams`; returns the losses
    (nats per token) of each step."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on biases and norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup)
        x = batch(streams, cfg.batch_size, cfg.block, gen)  # (B, T + 1)
        logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# --- tokenizers ---------------------------------------------------------------------------

#: Special tokens of the project's tokenizers: GPT-2's end of text, padding, BERT's specials.
SPECIALS = ["<|endoftext|>", "<pad>", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="[UNK]",
        model_max_length=256,
    )


def masked_tokenizer(base):
    """The same vocabulary with BERT-style special tokens for a masked LM."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        pad_token="<pad>",
        unk_token="[UNK]",
        model_max_length=256,
    )
