"""The demo build's pure parts: splits, the expert check, names, the LM training loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from serve_app.demo.build import (
    GENERAL_L,
    GENERAL_S,
    DemoConfig,
    Expert,
    check_experts,
    expert_name,
    library_dict,
    split_of,
)
from serve_app.demo.lm import LMConfig, ModelSize, Stream, batch, lr_at, new_model, train_lm


def losses(**by_expert):
    """expert -> domain -> bits per byte, from keyword tuples (code, legal)."""
    return {
        name.replace("_", "-"): dict(zip(("code", "legal"), v, strict=True))
        for name, v in by_expert.items()
    }


SPECIALISTS = {"code": "code-s", "legal": "legal-s"}


def test_the_check_passes_when_each_specialist_wins_its_domain_and_the_larger_generalist_wins():
    table = losses(
        general_s=(3.0, 3.0), general_l=(2.8, 2.9), code_s=(2.5, 3.4), legal_s=(3.5, 2.6)
    )
    assert check_experts(table, SPECIALISTS) == []


def test_the_check_names_each_failure():
    table = losses(
        general_s=(3.0, 3.0), general_l=(3.1, 2.9), code_s=(2.9, 3.4), legal_s=(3.5, 2.95)
    )
    failures = check_experts(table, SPECIALISTS)
    assert any("legal-s does not beat general-l on legal" in f for f in failures)
    assert any(f"{GENERAL_L} does not beat {GENERAL_S} on average" in f for f in failures)
    assert not any(f.startswith("code-s") for f in failures)
    assert len(failures) == 2


def test_splits_are_fixed_by_the_document_and_the_seed_and_near_their_fractions():
    cfg = DemoConfig()
    ids = [f"{i:016x}" for i in range(4000)]
    first = [split_of(i, cfg) for i in ids]
    assert first == [split_of(i, cfg) for i in ids]
    share = {s: first.count(s) / len(ids) for s in ("heldout", "router", "lm")}
    assert share["heldout"] == pytest.approx(cfg.heldout_fraction, abs=0.03)
    assert share["router"] == pytest.approx(cfg.router_fraction, abs=0.03)
    other = DemoConfig(seed=1)
    assert sum(split_of(i, other) != s for i, s in zip(ids, first, strict=True)) > 500


def test_expert_names_are_valid_library_names():
    assert expert_name("code") == "code-s"
    assert expert_name("Clinical Notes") == "clinical-notes-s"
    assert expert_name("de_DE") == "de-de-s"


def test_the_learning_rate_warms_up_then_decays_to_a_tenth():
    steps, lr = 100, 1e-3
    rates = [lr_at(s, steps, lr, 0.1) for s in range(steps)]
    assert rates[0] == pytest.approx(lr / 10)
    assert max(rates) == pytest.approx(lr)
    assert rates[-1] == pytest.approx(lr / 10, rel=0.05)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))


def test_windows_start_at_a_document_or_anywhere_and_wrap_round():
    s = Stream([[5, 6, 7], [8, 9]], bos=0)
    assert s.ids.tolist() == [0, 5, 6, 7, 0, 8, 9]
    assert s.window(4, 5).tolist() == [0, 8, 9, 0, 5]
    gen = torch.Generator().manual_seed(0)
    aligned = batch([s], 50, 3, gen, aligned=1.0)
    assert aligned.shape == (50, 4) and (aligned[:, 0] == 0).all()
    anywhere = batch([s], 50, 3, gen, aligned=0.0)
    assert (anywhere[:, 0] != 0).any()


def test_training_is_deterministic_for_a_seed_and_lowers_the_loss():
    cfg = LMConfig(vocab_size=32, block=16, batch_size=8, warmup=0.1)
    size = ModelSize(width=16, layers=1, heads=2)
    gen = torch.Generator().manual_seed(0)
    data = [Stream([torch.randint(2, 32, (40,), generator=gen).tolist()] * 5, bos=0)]

    def run():
        model = new_model(size, cfg.vocab_size, cfg.block, seed=3)
        trace = train_lm(model, data, steps=30, lr=1e-2, cfg=cfg, seed=4, progress=False)
        return trace, model.state_dict()

    (trace_a, state_a), (trace_b, state_b) = run(), run()
    assert trace_a == trace_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert sum(trace_a[-5:]) / 5 < sum(trace_a[:5]) / 5 - 0.5  # it learnt the repeated text


def test_only_an_expert_no_better_anywhere_and_no_smaller_is_left_out():
    from serve_app.demo.build import dominated

    losses = {
        "big": {"code": 1.0, "legal": 1.0},
        "small": {"code": 2.0, "legal": 2.0},  # worse, but smaller: it earns its size
        "code-s": {"code": 1.5, "legal": 3.0},  # beaten by nothing as small on code
        "copy": {"code": 2.0, "legal": 2.5},  # as small as `small` and worse: earns nothing
        "twin": {"code": 2.0, "legal": 2.0},  # ties with `small`: kept
    }
    params = {"big": 100, "small": 10, "code-s": 10, "copy": 10, "twin": 10}
    assert dominated(losses, params) == {"copy": "small"}


@pytest.mark.parametrize("cpus", [2, 4, 16])
@pytest.mark.parametrize("n", [4, 8, 15])
def test_the_router_at_its_most_and_a_replica_of_every_expert_fit_in_the_machine(cpus, n):
    experts = [Expert(f"e{i}", None, 1000, "2024-01-01", "an expert") for i in range(n)]
    library = library_dict(experts, cpus)
    router = library["router"]
    reserved = router["resources"]["num_cpus"] * router["autoscaling"]["max_replicas"]
    shares = [e["resources"]["num_cpus"] for e in library["experts"]]
    assert len(shares) == n and len(set(shares)) == 1
    assert reserved + sum(shares) <= cpus
    assert 0.01 <= shares[0] <= 0.25
    # A quarter of a CPU where it fits (16 CPUs; 4 CPUs and up to 12 experts), less where not.
    assert (shares[0] == 0.25) == (reserved + 0.25 * n <= cpus)
