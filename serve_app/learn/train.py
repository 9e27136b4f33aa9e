"""Training the perceptive router on a profile: encoder -> head predicting every expert's loss.

Two modes:
* frozen (default on CPU): the encoder embeds every prompt once (cached next to the profile),
  then only the head trains, in seconds.
* finetune (for GPU users): encoder and head train together through accelerate; the tuned
  encoder is saved inside the checkpoint (`encoder/`) and serves in place of router.model.

The objective is the mean squared error of the standardised loss predictions plus, with weight
`relative`, the squared error of each prompt's losses centred on their mean across experts, plus,
with weight `rank`, a listwise term: the cross-entropy between softmax(-predicted / T) and
softmax(-true / T) over the experts, T = `rank_temperature` bits per byte. The first term learns
how hard a prompt is, the second how the experts compare on it, the third which one is best,
which is what routing needs: the squared errors weigh every expert alike, so an MLP spends its
capacity on how bad the worst experts are, while the argmin depends on the best few (on the
11-domain routing benchmark the listwise term raised held-out top-1 from 0.835 to 0.902).
The split is fixed by prompt id and seed (serve_app.learn.data.in_split); training
stops when the validation error has not improved for `patience` epochs (`finetune_patience`
in finetune mode) and keeps the best state: one loop, `fit`, for both modes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from serve_app.config import LibraryConfig, LibraryError
from serve_app.files import readable
from serve_app.learn.data import in_split, unit_draw
from serve_app.learn.matrix import Matrix, Measure, pivot, save_reference
from serve_app.learn.metrics import choose, expert_errors, summarize
from serve_app.router import (
    MEASURES,
    Encoder,
    HeadConfig,
    Neighbours,
    RouterHead,
    embed,
    mix,
    save_head,
)


@dataclass
class TrainConfig:
    """How the router trains."""

    mode: str = "frozen"  # "frozen": head only, cached embeddings; "finetune": encoder too
    val_fraction: float = 0.2  # share of prompts held out for validation and early stopping
    seed: int = 0
    max_epochs: int = 300
    patience: int = 30  # epochs without a better validation error before stopping (head)
    finetune_patience: int = 3  # the same in finetune mode, where an epoch costs far more
    batch_size: int = 64
    lr: float = 2e-3  # head
    encoder_lr: float = 2e-5  # finetune mode
    weight_decay: float = 1e-4
    hidden: int = 256
    dropout: float = 0.1
    relative: float = 1.0  # weight of the centred (how-the-experts-compare) error
    rank: float = 1.0  # weight of the listwise (which-expert-is-best) cross-entropy
    rank_temperature: float = 0.1  # bits per byte: loss gaps well under it count as ties
    max_length: int = 256  # encoder tokens read from a prompt
    # How validation prompts are drawn: "prompt" (a share of prompts), "domain" or "group"
    # (whole domains or given groups held out), or "source" (sources held out within their
    # domains): settings that generalise to text unlike the training text (validation_mask).
    group_by: str = "prompt"
    # The served prediction mixes the MLP's, the domain prior's, the neighbours' and the base
    # rate's estimates (serve_app.router.HeadConfig); the weights (from mix_weights, summing
    # to at most 1) and the neighbours' k with the lowest validation regret win.
    mix_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    knn_ks: tuple[int, ...] = (10, 25, 50, 100)
    prior_steps: int = 300  # full-batch steps of the domain prior's classifier
    # Frozen mode, given at least 20 prompts a fold: the mix is chosen on out-of-fold
    # predictions over `mix_folds` folds drawn as validation is (of prompts, or of whole
    # groups: mix_folds_of), each fold's head trained as this one is on the other folds, not
    # on the one validation draw alone; the domain prior is then fit on every prompt
    # (choose_mix_folds). 0 or 1: off.
    mix_folds: int = 5


@dataclass
class Report:
    """What training did and how well the router routes the validation prompts."""

    mode: str
    experts: list[str]
    measure: dict  # the profile's Measure: its name, and whether higher is better
    n_train: int
    n_val: int
    epochs: int
    val_error: float  # mean squared error of standardised predictions, best epoch
    untrained_val_error: float  # the same for the head before training
    val: dict[str, float] = field(default_factory=dict)  # router: top1, regret, mean_loss
    val_best_single: dict[str, float] = field(default_factory=dict)
    val_oracle: dict[str, float] = field(default_factory=dict)
    expert_mae: dict[str, float] = field(default_factory=dict)  # in the measure's units
    group_by: str = "prompt"  # how validation prompts were drawn
    prior_weight: float = 0.0  # the mix chosen on validation or out of fold (mix_folds)
    knn_weight: float = 0.0
    knn_k: int = 0
    base_weight: float = 0.0
    val_mixes: list[dict] = field(default_factory=list)  # every setting tried, its figures
    # Folds the mix was chosen over (choose_mix_folds); then `val`, `val_best_single`,
    # `val_oracle` and `expert_mae` are out-of-fold figures over every prompt held out in a
    # fold (val["scored"] of them). 0: over the n_val validation prompts.
    mix_folds: int = 0

    def table(self) -> str:
        """A readable summary."""
        measure = Measure(**self.measure)
        lines = [
            f"router trained ({self.mode}): {self.n_train} train / {self.n_val} validation "
            f"prompts, {self.epochs} epochs",
            f"validation error (standardised MSE): {self.val_error:.4f} "
            f"(untrained head: {self.untrained_val_error:.4f})",
            f"measure: {measure.name}, {measure.direction}",
            "",
            f"{'validation':<12} {'top1':>6} {'regret':>8} {measure.name[:10]:>10}",
        ]
        for name, m in (
            ("router", self.val),
            ("best_single", self.val_best_single),
            ("oracle", self.val_oracle),
        ):
            shown = measure.shown(m["mean_loss"])
            lines.append(f"{name:<12} {m['top1']:>6.3f} {m['regret']:>8.4f} {shown:>10.4f}")
        mlp = 1 - self.prior_weight - self.knn_weight - self.base_weight
        if self.mix_folds:
            lines.append(
                f"figures out of fold over the {self.val['scored']} prompts held out in "
                f"{self.mix_folds} folds, the mix chosen on them"
            )
        lines.append(
            f"validation drawn by {self.group_by}; prediction = {mlp:g} MLP + "
            f"{self.prior_weight:g} domain prior + {self.knn_weight:g} neighbours"
            + (f" (k {self.knn_k})" if self.knn_weight else "")
            + f" + {self.base_weight:g} base rate"
        )
        lines += ["", f"per-expert mean absolute error ({measure.name}):"]
        lines += [f"  {name:<20} {mae:.4f}" for name, mae in self.expert_mae.items()]
        return "\n".join(lines)


def _loss(head: RouterHead, emb: torch.Tensor, z: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Standardised MSE, the centred error and the listwise term (see the module docstring),
    over the measured cells only: z is NaN where an expert's loss on a prompt is missing."""
    known = ~torch.isnan(z)  # (B, E)
    m = known.to(z.dtype)
    z = torch.where(known, z, torch.zeros_like(z))
    cells = m.sum().clamp(min=1)
    out = head(emb)  # (B, E) standardised
    loss = (((out - z) ** 2) * m).sum() / cells
    pred = out * head.std + head.mean  # (B, E) losses
    true = z * head.std + head.mean
    if cfg.relative:
        count = m.sum(1, keepdim=True).clamp(min=1)
        centred = (pred - (pred * m).sum(1, keepdim=True) / count) - (
            true - (true * m).sum(1, keepdim=True) / count
        )
        loss = loss + cfg.relative * ((centred**2) * m).sum() / cells / (head.std**2).mean()
    if cfg.rank:
        hide = ~known
        target = torch.softmax((-true / cfg.rank_temperature).masked_fill(hide, -1e9), dim=1)
        logp = torch.log_softmax((-pred / cfg.rank_temperature).masked_fill(hide, -1e9), dim=1)
        loss = loss + cfg.rank * -(target * logp.masked_fill(hide, 0.0)).sum(1).mean()
    return loss


def _error(head: RouterHead, emb: torch.Tensor, z: torch.Tensor) -> float:
    """Standardised mean squared error over the measured cells."""
    head.eval()
    with torch.no_grad():
        err = (head(emb) - z) ** 2
        return float(err[~torch.isnan(z)].mean())


def validation_mask(
    matrix: Matrix, cfg: TrainConfig, groups: list[str] | None = None
) -> np.ndarray:
    """Which prompts of the matrix validate (N,): drawn by prompt id, or by group so that
    whole groups are held out (at least one group stays on each side). The groups are the
    prompts' domains for group_by "domain", `groups` (one per prompt: their sources, say)
    for "group"; "source" holds out groups within every domain that has two or more (new
    sources of known domains: what a router meets in service), the others all train."""
    if cfg.group_by == "domain":
        groups = matrix.domains
    elif cfg.group_by != "prompt" and (cfg.group_by not in ("group", "source") or groups is None):
        raise ValueError(
            f"group_by {cfg.group_by!r}: use prompt, domain, or group or source with groups"
        )
    # By prompt, or one group (nothing to hold out whole): a share of the prompts.
    if cfg.group_by == "prompt" or len(set(groups)) < 2:
        return np.array([in_split(i, cfg.val_fraction, cfg.seed) for i in matrix.ids])
    if cfg.group_by == "source":  # unseen sources of seen domains
        held_out = np.zeros(len(groups), dtype=bool)
        for domain in sorted(set(matrix.domains)):
            idx = np.array([d == domain for d in matrix.domains])
            mine = [g for g, i in zip(groups, idx, strict=True) if i]
            if len(set(mine)) >= 2:
                held_out[idx] = _held(mine, cfg)
        if held_out.any():
            return held_out
    return _held(groups, cfg)


def folds_within_domains(groups: list[str], domains: list[str], folds: int) -> np.ndarray:
    """Folds for unseen sources of seen domains: within every domain of two or more groups,
    its groups cut into folds (folds_of); a domain of one group is never held out (-1), so
    every held-out prompt's domain is one the router trained on, from other sources."""
    out = np.full(len(groups), -1)
    for domain in sorted(set(domains)):
        idx = [i for i, d in enumerate(domains) if d == domain]
        mine = [groups[i] for i in idx]
        if len(set(mine)) >= 2:
            out[idx] = folds_of(mine, min(folds, len(set(mine))))
    return out


def folds_of(groups: list[str], folds: int) -> np.ndarray:
    """A fold (0..folds-1) per prompt, whole groups together, folds of similar size: the
    largest groups first, each to the fold with the fewest prompts (ties by name)."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    load = [0] * folds
    fold_of: dict[str, int] = {}
    for g in sorted(sizes, key=lambda g: (-sizes[g], g)):
        f = min(range(folds), key=lambda i: (load[i], i))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.array([fold_of[g] for g in groups])


def _held(groups: list[str], cfg: TrainConfig) -> np.ndarray:
    """Whole groups drawn for validation, at least one on each side."""
    names = sorted(set(groups))
    if len(names) < 2:
        raise LibraryError(f"validation by {cfg.group_by} needs at least two of them")
    held = {g for g in names if in_split(g, cfg.val_fraction, cfg.seed)}
    if not held or held == set(names):  # a draw that left one side empty
        order = sorted(names, key=lambda g: unit_draw(g, cfg.seed, "split"))
        held = set(order[: max(1, round(cfg.val_fraction * len(names)))])
    return np.array([g in held for g in groups])


def fit_prior(
    head: RouterHead, emb: torch.Tensor, domains: list[str], losses: np.ndarray, cfg: TrainConfig
) -> None:
    """Fit the head's domain prior on training prompts: a linear classifier of the domain
    (full-batch AdamW, `prior_steps` steps) and each domain's mean loss per expert (the mean
    over all training prompts where a domain never measured an expert). Prompts of a domain
    the head does not know (one whose prompts all validated when its MLP trained) are left
    out."""
    names = head.cfg.domains
    known = np.isin(domains, names)
    if not known.all():
        emb, losses = emb[torch.from_numpy(known)], losses[known]
        domains = [d for d, k in zip(domains, known, strict=True) if k]
    y = torch.tensor([names.index(d) for d in domains])
    overall = np.nan_to_num(np.nanmean(losses, 0))
    means = []
    for name in names:
        rows = losses[np.array(domains) == name]
        m = np.nanmean(rows, 0) if len(rows) else np.full(losses.shape[1], np.nan)
        means.append(np.where(np.isnan(m), overall, m))
    head.domain_means.copy_(torch.tensor(np.array(means), dtype=torch.float32))
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(head.domain.parameters(), lr=0.05, weight_decay=cfg.weight_decay)
    head.train()
    for _ in range(cfg.prior_steps):
        loss = torch.nn.functional.cross_entropy(head.domain(emb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()


def finish_head(
    head: RouterHead, emb: torch.Tensor, matrix: Matrix, val_mask: np.ndarray, cfg: TrainConfig
) -> tuple[list[dict], np.ndarray]:
    """After the MLP: fit the domain prior on the training prompts, then choose the mix on
    the validation prompts (choose_mix's return)."""
    if head.cfg.domains:
        train_domains = [d for d, v in zip(matrix.domains, val_mask, strict=True) if not v]
        fit_prior(
            head, emb[torch.from_numpy(~val_mask)], train_domains, matrix.losses[~val_mask], cfg
        )
    return choose_mix(head, emb, matrix.losses, val_mask, cfg)


def choose_mix(
    head: RouterHead,
    emb: torch.Tensor,
    losses: np.ndarray,
    val_mask: np.ndarray,
    cfg: TrainConfig,
) -> tuple[list[dict], np.ndarray]:
    """Choose the weights of the MLP, the domain prior, neighbour evidence and the base rate
    (and the neighbours' k) on the validation prompts, neighbours drawn from the training
    prompts only; set them in the head's config. Returns (every setting tried with its
    figures, the validation predictions)."""
    is_val = torch.from_numpy(val_mask)
    neighbours = Neighbours(emb[~is_val], torch.tensor(losses[~val_mask]))
    parts = _parts(head, neighbours, emb[is_val], cfg.knn_ks)
    return _search_mix(head, parts, losses[val_mask], cfg)


def _parts(
    head: RouterHead, neighbours: Neighbours, emb: torch.Tensor, ks: tuple[int, ...]
) -> dict:
    """What a mix is made of, for prompts (B, H): the MLP's, the domain prior's (the base
    rate's where the head has no prior: it saw one domain, whose mean that is), the base
    rate's and, for every k, the neighbours' predicted losses (B, E)."""
    with torch.no_grad():
        base = head.mean.expand(len(emb), -1)
        return {
            "mlp": head.predict(emb),
            "prior": head.prior(emb) if head.cfg.domains else base,
            "base": base,
            "knn": {k: neighbours.mean_loss(emb, k) for k in ks},
        }


def _search_mix(
    head: RouterHead, parts: dict, losses: np.ndarray, cfg: TrainConfig
) -> tuple[list[dict], np.ndarray]:
    """Try every mix of `parts` (_parts) against the true losses (N, E) and set the winner in
    the head's config; returns (every setting tried with its regret, the winner's
    predictions).

    The MLP alone is the default. Another setting replaces it only where its regret is lower
    by more than one standard error of the paired difference (prompt by prompt): with a few
    dozen validation prompts, dozens of settings tried would otherwise pick one that won by
    chance. Among those, the lowest regret wins."""
    # Settings compare on the same prompts: a choice is made among the measured experts of
    # each prompt, so no setting gains by choosing unmeasured ones.
    best_true = np.nanmin(losses, axis=1)
    rows = np.arange(len(losses))
    mlp, knn = parts["mlp"], parts["knn"]
    prior = parts["prior"] if head.cfg.domains else None

    def regrets(pred: torch.Tensor) -> np.ndarray:
        picked = choose(among_measured(pred.numpy(), losses))
        return losses[rows, picked] - best_true  # (N,)

    default = regrets(mlp)
    weights = sorted({0.0, *cfg.mix_weights})
    tried: list[dict] = []
    best = (float(default.mean()), 0.0, 0.0, 0, 0.0, mlp)
    for wp in weights if prior is not None else [0.0]:
        for wk in (w for w in weights if wp + w <= 1 + 1e-9):
            for wb in (w for w in weights if wp + wk + w <= 1 + 1e-9):
                for k in cfg.knn_ks if wk else (0,):
                    pred = mix(mlp, prior, knn.get(k), wp, wk, parts["base"], wb)
                    r = regrets(pred)
                    gain = default - r
                    se = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else np.inf
                    clear = gain.mean() > se
                    tried.append(
                        {
                            "prior_weight": wp,
                            "knn_weight": wk,
                            "k": k,
                            "base_weight": wb,
                            "regret": float(r.mean()),
                            "clear_of_mlp": bool(clear),
                        }
                    )
                    if clear and r.mean() < best[0] - 1e-9:
                        best = (float(r.mean()), wp, wk, k, wb, pred)
    _, head.cfg.prior_weight, head.cfg.knn_weight, head.cfg.knn_k, head.cfg.base_weight, pred = best
    return tried, pred.numpy()


def mix_folds_of(matrix: Matrix, cfg: TrainConfig, groups: list[str]) -> np.ndarray | None:
    """The folds the mix is chosen over (TrainConfig.mix_folds), drawn as validation is: one
    fold (0..k-1) a prompt by prompt id, or whole groups (`groups`, one a prompt; the domains
    for group_by "domain") cut into folds, within their domains for "source"
    (folds_within_domains: a prompt of a domain with one group is never held out, -1). None
    where folds do not apply: finetune mode, mix_folds under 2, fewer than two folds to hold
    out, or fewer than 20 prompts held out a fold."""
    k = cfg.mix_folds
    if cfg.mode != "frozen" or k < 2 or len(matrix.ids) < 20 * k:
        return None
    if cfg.group_by == "prompt":
        draws = [unit_draw(i, cfg.seed, "mix fold") for i in matrix.ids]
        return np.array([min(int(u * k), k - 1) for u in draws])
    groups = matrix.domains if cfg.group_by == "domain" else groups
    if cfg.group_by == "source":
        fold = folds_within_domains(groups, matrix.domains, k)
    else:
        fold = folds_of(groups, min(k, len(set(groups))))
    held = fold[fold >= 0]
    n = len(set(held.tolist()))
    return fold if n >= 2 and len(held) >= 20 * n else None


@dataclass
class Folded:
    """The mix chosen over folds (choose_mix_folds): every setting tried, and for the prompts
    held out in a fold (`judged`, N), the winner's out-of-fold predictions and the base rate's
    (what the best single expert goes by), each (judged prompts, E)."""

    tried: list[dict]
    folds: int  # folds with prompts held out
    judged: np.ndarray
    pred: np.ndarray
    base: np.ndarray


def fold_rest(
    matrix: Matrix, emb: torch.Tensor, groups: list[str], out: np.ndarray, cfg: TrainConfig
) -> tuple[Matrix, torch.Tensor, list[str], np.ndarray]:
    """What a fold's head trains on: the prompts outside `out` (N,), their embeddings and
    groups, and their validation mask drawn as `cfg` draws it (one group left: a share of
    prompts)."""
    rest = matrix.subset(~out)
    rest_groups = [g for g, o in zip(groups, out, strict=True) if not o]
    return rest, emb[torch.from_numpy(~out)], rest_groups, validation_mask(rest, cfg, rest_groups)


def choose_mix_folds(
    head: RouterHead,
    emb: torch.Tensor,
    matrix: Matrix,
    cfg: TrainConfig,
    fold: np.ndarray,
    groups: list[str],
) -> Folded | None:
    """Choose the mix (as choose_mix does) on out-of-fold predictions over the folds of
    mix_folds_of: each fold's parts come from a head trained the way `head` was (its MLP on
    the other folds' training prompts, stopped on their validation prompts, drawn as `cfg`
    draws them; its prior and neighbours on all the other folds' prompts). A choice made on
    every prompt held out in a fold, instead of the one validation draw, is less a matter of
    which prompts fell in that draw: with validation by source, a few dozen prompts of a few
    sources. Then the head's domain prior is fit on every prompt: no prompt is left to hold
    out of it. None where a fold left no prompt to stop its MLP on."""
    parts: dict = {}
    knn: dict[int, torch.Tensor] = {}
    for f in sorted(set(fold[fold >= 0].tolist())):
        out = fold == f
        rest, rest_emb, _, val = fold_rest(matrix, emb, groups, out, cfg)
        if val.all() or not val.any():
            return None
        fold_head, *_ = train_head_split(rest_emb, rest, val, cfg)
        if fold_head.cfg.domains:
            fit_prior(fold_head, rest_emb, rest.domains, rest.losses, cfg)
        mine = _parts(
            fold_head,
            Neighbours(rest_emb, torch.tensor(rest.losses)),
            emb[torch.from_numpy(out)],
            cfg.knn_ks,
        )
        at = torch.from_numpy(np.flatnonzero(out))
        for name in ("mlp", "prior", "base"):
            parts.setdefault(name, torch.full(matrix.losses.shape, np.nan))[at] = mine[name]
        for j, got in mine["knn"].items():
            knn.setdefault(j, torch.full(matrix.losses.shape, np.nan))[at] = got
    judged = fold >= 0
    keep = torch.from_numpy(judged)
    parts = {name: parts[name][keep] for name in ("mlp", "prior", "base")}
    parts["knn"] = {j: got[keep] for j, got in knn.items()}
    if head.cfg.domains:
        fit_prior(head, emb, matrix.domains, matrix.losses, cfg)
    tried, pred = _search_mix(head, parts, matrix.losses[judged], cfg)
    folds = len(set(fold[judged].tolist()))
    return Folded(tried, folds, judged, pred, parts["base"].numpy())


def settle_mix(
    head: RouterHead,
    emb: torch.Tensor,
    matrix: Matrix,
    val_mask: np.ndarray,
    cfg: TrainConfig,
    groups: list[str],
) -> tuple[Folded | None, list[dict], np.ndarray]:
    """After the MLP: the domain prior and the mix, over folds where they apply
    (mix_folds_of, choose_mix_folds), else on the validation prompts (finish_head). Returns
    (the folds' result or None, every setting tried, the winner's predictions for the
    prompts it was chosen on)."""
    fold = mix_folds_of(matrix, cfg, groups)
    folded = choose_mix_folds(head, emb, matrix, cfg, fold, groups) if fold is not None else None
    if folded:
        return folded, folded.tried, folded.pred
    tried, pred = finish_head(head, emb, matrix, val_mask, cfg)
    return None, tried, pred


def train_head(
    train_emb: torch.Tensor,
    train_y: np.ndarray,
    val_emb: torch.Tensor,
    val_y: np.ndarray,
    experts: list[str],
    cfg: TrainConfig,
    domains: list[str] | None = None,
) -> tuple[RouterHead, int, float, float]:
    """Fit a head's MLP on fixed embeddings (and give it a domain prior over `domains`, to
    fit with fit_prior, when there are two or more); returns (best head, epochs run, its
    validation error, the untrained head's validation error)."""
    torch.manual_seed(cfg.seed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an expert never measured here
        mean = np.nanmean(train_y, 0)
        std = np.nanstd(train_y, 0)
    # An expert with no training value gets the worst mean of the others (never the best
    # by default) and unit scale.
    mean = np.where(np.isnan(mean), np.nanmax(mean) if (~np.isnan(mean)).any() else 0.0, mean)
    std = np.maximum(np.where(np.isnan(std), 1.0, std), 1e-3)
    head = RouterHead(
        HeadConfig(
            experts=experts,
            embed_dim=train_emb.shape[1],
            hidden=cfg.hidden,
            dropout=cfg.dropout,
            max_length=cfg.max_length,
            target_mean=mean.tolist(),
            target_std=std.tolist(),
            domains=sorted(set(domains)) if domains and len(set(domains)) > 1 else [],
        )
    )
    z_train = torch.tensor((train_y - mean) / std, dtype=torch.float32)  # (N, E)
    z_val = torch.tensor((val_y - mean) / std, dtype=torch.float32)
    untrained = _error(head, val_emb, z_val)
    opt = torch.optim.AdamW(head.mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    def epoch() -> None:
        head.train()
        for idx in torch.randperm(len(z_train), generator=gen).split(cfg.batch_size):
            loss = _loss(head, train_emb[idx], z_train[idx], cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()

    epochs, best = fit(
        epoch, lambda: _error(head, val_emb, z_val), [head], cfg.max_epochs, cfg.patience
    )
    return head.eval(), epochs, best, untrained


def train_head_split(
    emb: torch.Tensor, matrix: Matrix, val_mask: np.ndarray, cfg: TrainConfig
) -> tuple[RouterHead, int, float, float]:
    """train_head on a matrix's prompts (emb: their embeddings, N x H): the MLP on those
    outside `val_mask`, stopped on those in it; the domain prior over the training prompts'
    domains."""
    is_val = torch.from_numpy(val_mask)
    return train_head(
        emb[~is_val],
        matrix.losses[~val_mask],
        emb[is_val],
        matrix.losses[val_mask],
        matrix.experts,
        cfg,
        domains=[d for d, v in zip(matrix.domains, val_mask, strict=True) if not v],
    )


def fit(
    epoch: Callable[[], None],
    val_error: Callable[[], float],
    modules: list[torch.nn.Module],
    max_epochs: int,
    patience: int,
    best: float = float("inf"),
) -> tuple[int, float]:
    """Early stopping, for both training modes: run `epoch` until the validation error has not
    improved for `patience` epochs, then restore the modules' best state. `best` is the error
    to beat (a warm start's). Returns (epochs run, best validation error)."""
    best_state = [copy.deepcopy(m.state_dict()) for m in modules]
    since, epochs = 0, 0
    for n in range(max_epochs):
        epoch()
        epochs = n + 1
        error = val_error()
        if error < best - 1e-6:
            best, since = error, 0
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
        else:
            since += 1
            if since >= patience:
                break
    for module, state in zip(modules, best_state, strict=True):
        module.load_state_dict(state)
    return epochs, best


def embeddings(encoder: Encoder, matrix: Matrix, cache: Path | None) -> torch.Tensor:
    """Embeddings (N, H) of the matrix's prompts, read from or written to `cache`."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha1(
        json.dumps([encoder.name, encoder.max_length, matrix.ids]).encode()
    ).hexdigest()[:16]
    file = cache / f"{key}.safetensors" if cache else None
    if file and file.exists():
        return load_file(str(file))["embeddings"]
    emb = encoder.encode(matrix.texts, progress=True)
    if file:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb.contiguous()}, str(file))
        readable(file)
    return emb


def train(
    library: LibraryConfig,
    table: pa.Table,
    out: str | Path,
    cfg: TrainConfig | None = None,
    cache: Path | None = None,
    groups: dict[str, str] | None = None,
) -> Report:
    """Train the router of `library` on a profile table; write the checkpoint folder `out`.
    `groups` (prompt id -> source) serve validation by group or source (TrainConfig.group_by).

    The checkpoint is written beside `out` and renamed into place (serve_app.files): head,
    reference, report, the experts' measured verbosity and readability (`measures.json`) and,
    in finetune mode, the tuned encoder (`encoder/`). library.yaml is not touched.
    """
    from serve_app.files import new_folder
    from serve_app.learn.profile import measures

    cfg = cfg or TrainConfig()
    if cfg.mode not in ("frozen", "finetune"):
        raise ValueError(f"unknown training mode {cfg.mode!r}; known: frozen, finetune")
    matrix = pivot(table, library.names, complete=False)
    # A prompt's group (its source, by prompt id) for group_by "group" and "source"; a
    # prompt without one is a group of its domain.
    by_prompt = [(groups or {}).get(i, d) for i, d in zip(matrix.ids, matrix.domains, strict=True)]
    val_mask = validation_mask(matrix, cfg, by_prompt)
    train_m, val_m = matrix.subset(~val_mask), matrix.subset(val_mask)
    if len(train_m.ids) < 2 or len(val_m.ids) < 1:
        raise LibraryError(
            f"the profile has {len(matrix.ids)} prompt(s) measured on an expert; "
            "training needs at least a few dozen"
        )
    encoder = Encoder(library.router.model, max_length=cfg.max_length)
    with new_folder(out) as folder:
        if cfg.mode == "finetune":
            head, epochs, err, untrained = finetune(
                encoder, train_m, val_m, cfg, folder / "encoder"
            )
            encoder_name = "encoder"  # inside the checkpoint: it replaces router.model
            emb = embeddings(encoder, matrix, None)  # the tuned encoder embeds anew
        else:
            emb = embeddings(encoder, matrix, cache)  # (N, H), every prompt embedded once
            head, epochs, err, untrained = train_head_split(emb, matrix, val_mask, cfg)
            encoder_name = library.router.model
        folded, mixes, pred = settle_mix(head, emb, matrix, val_mask, cfg, by_prompt)
        if folded:  # figures out of fold over every prompt held out in a fold
            scored, base = matrix.losses[folded.judged], folded.base
        else:  # figures over the validation prompts; the base rate of the training ones
            scored = val_m.losses
            base = np.broadcast_to(np.nanmean(train_m.losses, 0), scored.shape)
        save_head(head, folder, encoder=encoder_name)
        # The knn and best_single baselines read the whole profile (training and validation
        # prompts: neither learns anything that needs holding out) from the checkpoint.
        save_reference(folder, emb, matrix)
        measured = {name: m for name, m in measures(table).items() if name in library.names}
        (folder / MEASURES).write_text(json.dumps(measured, indent=2) + "\n")
        report = Report(
            mode=cfg.mode,
            experts=matrix.experts,
            measure=matrix.measure.as_json(),
            n_train=len(train_m.ids),
            n_val=len(val_m.ids),
            epochs=epochs,
            val_error=err,
            untrained_val_error=untrained,
            val=summarize(choose(among_measured(pred, scored)), scored),
            val_best_single=summarize(choose(among_measured(base, scored)), scored),
            val_oracle=summarize(choose(scored), scored),
            expert_mae=expert_errors(pred, scored, matrix.experts),
            group_by=cfg.group_by,
            prior_weight=head.cfg.prior_weight,
            knn_weight=head.cfg.knn_weight,
            knn_k=head.cfg.knn_k,
            base_weight=head.cfg.base_weight,
            val_mixes=mixes,
            mix_folds=folded.folds if folded else 0,
        )
        (folder / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def among_measured(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Predictions (N, E) with the experts a prompt was never measured on (NaN in `truth`)
    made the worst: a choice among the measured ones, so every method compared (the mixes
    _search_mix tries, the rows of the training report) is judged on the same prompts."""
    return np.where(np.isnan(truth), np.inf, pred)


def length_batches(
    counts: list[int], order: list[int], size: int, gen: torch.Generator | None = None
) -> list[list[int]]:
    """Batches of `size` indices of similar token count, for training an encoder on a CPU,
    where padding every batch to its longest prompt costs several times the tokens it holds
    (RouterDC's prompts: 82 tokens on average, up to 256). `order` is cut into windows of 50
    batches, each sorted by length and cut into batches; with `gen` the batches are then
    shuffled. Every index of `order` is in exactly one batch."""
    window = size * 50
    out: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda j: counts[j])
        out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    if gen is not None:
        out = [out[k] for k in torch.randperm(len(out), generator=gen).tolist()]
    return out


def finetune(
    encoder: Encoder, train_m: Matrix, val_m: Matrix, cfg: TrainConfig, encoder_out: Path
) -> tuple[RouterHead, int, float, float]:
    """Train encoder and head together through accelerate; save the encoder to `encoder_out`.

    The head first fits on frozen embeddings (a warm start, so the encoder is not pulled
    around by a random head), then both train with separate learning rates.
    """
    from accelerate import Accelerator

    head, _, _, untrained = train_head(
        encoder.encode(train_m.texts),
        train_m.losses,
        encoder.encode(val_m.texts),
        val_m.losses,
        train_m.experts,
        cfg,
        domains=train_m.domains,
    )
    accel = Accelerator(cpu=not torch.cuda.is_available())
    model = encoder.model
    opt = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": cfg.encoder_lr},
            {"params": head.parameters(), "lr": cfg.lr / 10},
        ],
        weight_decay=cfg.weight_decay,
    )
    model, head, opt = accel.prepare(model, head, opt)
    z_train = torch.tensor((train_m.losses - head.mean.cpu().numpy()) / head.std.cpu().numpy())
    z_val = torch.tensor((val_m.losses - head.mean.cpu().numpy()) / head.std.cpu().numpy())

    def tokenized(texts: list[str]) -> list[dict]:
        """Each prompt's tokens, once: batches only pad them (tokenizer.pad)."""
        enc = encoder.tokenizer(texts, truncation=True, max_length=cfg.max_length)
        return [{k: enc[k][j] for k in enc} for j in range(len(texts))]

    tokens = {"train": tokenized(train_m.texts), "val": tokenized(val_m.texts)}
    counts = {split: [len(t["input_ids"]) for t in rows] for split, rows in tokens.items()}

    def batches(split: str, order: list[int], gen: torch.Generator | None = None):
        for idx in length_batches(counts[split], order, cfg.batch_size, gen):
            rows = [tokens[split][j] for j in idx]
            yield idx, encoder.tokenizer.pad(rows, return_tensors="pt").to(accel.device)

    def val_error() -> float:
        model.eval()
        head.eval()
        total = 0.0
        with torch.no_grad():
            for idx, enc in batches("val", list(range(len(val_m.texts)))):
                out = head(embed(model, enc))
                err = (out - z_val[idx].to(out)) ** 2
                total += float(err[~torch.isnan(err)].sum())  # measured cells only
        return total / max(1, int((~torch.isnan(z_val)).sum()))

    gen = torch.Generator().manual_seed(cfg.seed)

    def epoch() -> None:
        model.train()
        head.train()
        order = torch.randperm(len(train_m.texts), generator=gen).tolist()
        for idx, enc in batches("train", order, gen):
            loss = _loss(head, embed(model, enc), z_train[idx].to(accel.device).float(), cfg)
            opt.zero_grad()
            accel.backward(loss)
            opt.step()

    epochs, best = fit(
        epoch, val_error, [model, head], cfg.max_epochs, cfg.finetune_patience, best=val_error()
    )
    model = accel.unwrap_model(model)
    model.save_pretrained(encoder_out, safe_serialization=True)
    encoder.tokenizer.save_pretrained(encoder_out)
    encoder.model = model.eval()
    return accel.unwrap_model(head).cpu().eval(), epochs, best, untrained
