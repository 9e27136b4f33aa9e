"""The autoscaling defaults: valid for Serve, the router always up, experts scale to zero."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig

from serve_app.config import (
    EXPERT_AUTOSCALING_DEFAULTS,
    ROUTER_AUTOSCALING_DEFAULTS,
    ExpertConfig,
    RouterConfig,
)


@pytest.mark.parametrize("defaults", [ROUTER_AUTOSCALING_DEFAULTS, EXPERT_AUTOSCALING_DEFAULTS])
def test_defaults_are_valid_serve_autoscaling_configs(defaults):
    config = AutoscalingConfig.model_validate(defaults)
    assert config.max_replicas >= 1


def test_router_keeps_a_replica_by_default():
    router = RouterConfig(checkpoint="router")
    assert router.autoscaling == ROUTER_AUTOSCALING_DEFAULTS
    assert router.autoscaling["min_replicas"] >= 1
    # A second router replica (a second GPU) only past half a batch on average.
    assert router.autoscaling["target_ongoing_requests"] * 2 <= router.batching.max_batch_size


def test_experts_scale_to_zero_and_keep_the_last_replica_a_while():
    expert = ExpertConfig(name="x", model="org/x", task="fill-mask", released="2024-01-01")
    scaling = expert.autoscaling
    assert scaling == EXPERT_AUTOSCALING_DEFAULTS
    assert scaling["min_replicas"] == scaling["initial_replicas"] == 0
    assert scaling["downscale_to_zero_delay_s"] >= scaling["downscale_delay_s"]
