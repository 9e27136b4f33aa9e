"""The router head, its checkpoint, the registry, and the packaged MiniLM encoder."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from serve_app.config import minilm_path
from serve_app.learn.baselines import ROUTERS, make_router
from serve_app.router import (
    Encoder,
    HeadConfig,
    RouterHead,
    load_head,
    read_head_config,
    save_head,
)

EXPERTS = ["gen-xs", "gen-s", "mask-s"]


def _head(**overrides) -> RouterHead:
    torch.manual_seed(0)
    cfg = HeadConfig(experts=EXPERTS, embed_dim=8, hidden=16, **overrides)
    return RouterHead(cfg).eval()


def test_head_config_defaults_to_identity_scaling():
    cfg = HeadConfig(experts=EXPERTS)
    assert cfg.target_mean == [0.0, 0.0, 0.0]
    assert cfg.target_std == [1.0, 1.0, 1.0]


def test_head_config_needs_one_mean_per_expert():
    with pytest.raises(AssertionError, match="one mean and std per expert"):
        HeadConfig(experts=EXPERTS, target_mean=[1.0])


def test_head_maps_embeddings_to_one_prediction_per_expert():
    head = _head()
    emb = torch.randn(5, 8)  # (B, H)
    assert head(emb).shape == (5, 3)  # (B, E)
    assert head.predict(emb).shape == (5, 3)


def test_predict_undoes_the_target_standardisation():
    head = _head(target_mean=[3.0, 1.0, 0.0], target_std=[2.0, 0.5, 1.0])
    # Make the standardised output a known constant, whatever the embedding.
    last = head.mlp[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([1.0, -1.0, 0.25]))
    out = head.predict(torch.randn(2, 8))
    # loss = out * std + mean
    assert out.tolist() == [[5.0, 0.5, 0.25], [5.0, 0.5, 0.25]]


def test_a_saved_head_loads_with_the_same_config_and_predictions(tmp_path):
    head = _head(target_mean=[1.5, 2.0, 2.5], target_std=[0.3, 0.2, 0.1], max_length=64)
    folder = save_head(head, tmp_path / "router")
    assert (folder / "router.json").is_file()
    assert (folder / "head.safetensors").is_file()

    loaded = load_head(folder)
    assert asdict(loaded.cfg) == asdict(head.cfg)
    assert not loaded.training  # eval mode: dropout off, predictions repeat
    emb = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded.predict(emb), head.predict(emb))
        assert torch.equal(loaded.predict(emb), loaded.predict(emb))


def test_read_head_config_reads_the_shapes_without_the_weights(tmp_path):
    head = _head(target_mean=[1.0, 2.0, 3.0])
    save_head(head, tmp_path, encoder="some/encoder")
    (tmp_path / "head.safetensors").unlink()
    cfg = read_head_config(tmp_path)
    assert cfg == head.cfg
    assert cfg.experts == EXPERTS


def test_make_router_refuses_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ValueError, match="'oracel'") as err:
        make_router("oracel")
    for name in ROUTERS:
        assert name in str(err.value)


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    """The packaged all-MiniLM-L6-v2 (90 MB): loaded once for the module."""
    return Encoder(str(minilm_path()))


def test_minilm_gives_normalised_384_dim_embeddings_that_place_meaning(minilm):
    texts = [
        "The cat sat on the mat.",
        "A cat is sitting on a rug.",
        "Stock markets fell sharply after the interest rate decision.",
    ]
    emb = minilm.encode(texts, batch_size=2)  # two batches
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    # Padding in a batch does not change a short text's embedding (mean over real tokens).
    assert torch.allclose(minilm.encode(texts[:1])[0], emb[0], atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_the_served_prediction_mixes_mlp_domain_prior_and_neighbours(tmp_path):
    from serve_app.router import Neighbours, mix, predict_mixed

    torch.manual_seed(0)
    cfg = HeadConfig(
        experts=["a", "b"],
        embed_dim=8,
        hidden=16,
        domains=["code", "prose"],
        prior_weight=0.5,
        knn_weight=0.25,
        knn_k=2,
    )
    head = RouterHead(cfg).eval()
    with torch.no_grad():
        head.domain.weight.copy_(torch.tensor([[10.0] + [0.0] * 7, [-10.0] + [0.0] * 7]))
        head.domain.bias.zero_()
        head.domain_means.copy_(torch.tensor([[1.0, 3.0], [4.0, 2.0]]))
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.5] + [0.0] * 6]), dim=1)  # "code"
    ref = torch.eye(8)[:3]  # three reference prompts: the first two are the nearest
    losses = torch.tensor([[0.0, 8.0], [2.0, float("nan")], [9.0, 9.0]])
    neighbours = Neighbours(ref, losses)
    with torch.no_grad():
        mlp = head.predict(emb)
        got = predict_mixed(head, emb, neighbours)
    prior = torch.tensor([[1.0, 3.0]])  # P(code) ~ 1: code's mean losses
    knn = torch.tensor([[1.0, 8.0]])  # the mean of the 2 nearest, NaN left out
    assert torch.allclose(got, 0.25 * mlp + 0.5 * prior + 0.25 * knn, atol=1e-4)
    # Where the neighbours measured nothing, the MLP stands in for them.
    nan = torch.full((1, 2), float("nan"))
    assert torch.allclose(mix(mlp, prior, nan, 0.5, 0.25), 0.5 * mlp + 0.5 * prior)
    # The prior survives a save and a load.
    loaded = load_head(save_head(head, tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.allclose(loaded.prior(emb), head.prior(emb))
    assert loaded.cfg.prior_weight == 0.5 and loaded.cfg.domains == ["code", "prose"]


def test_router_replica_runs_torch_with_the_librarys_thread_count(smoke_library):
    """router.threads reaches the replica's torch thread (Ray alone would give a replica with
    half a CPU one thread; the smoke library's own value is 1, so this asks for 2)."""
    import asyncio

    from deployments.router import RouterDeployment
    from serve_app.config import load_library

    router = load_library(smoke_library).router
    replica = RouterDeployment.func_or_class(
        encoder=router.model, checkpoint=str(router.checkpoint), threads=2
    )
    try:
        assert asyncio.run(replica.stats())["threads"] == 2
    finally:
        replica.torch.shutdown()


def test_finetuning_batches_hold_prompts_of_similar_length_each_once():
    from serve_app.learn.train import length_batches

    counts = [(i * 37) % 256 + 1 for i in range(1000)]  # token counts, scattered
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    batches = length_batches(counts, order, 16, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sorted(len(b) for b in batches) == [1000 % 16] + [16] * (1000 // 16)
    padded = sum(len(b) * max(counts[i] for i in b) for b in batches)
    shuffled = sum(  # the same order cut into batches as it comes
        len(order[i : i + 16]) * max(counts[j] for j in order[i : i + 16])
        for i in range(0, 1000, 16)
    )
    assert padded < 0.7 * shuffled  # one window of 800: most of the padding is gone
    # shuffled batches: not in length order
    assert [max(counts[i] for i in b) for b in batches] != sorted(
        max(counts[i] for i in b) for b in batches
    )
