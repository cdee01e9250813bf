"""The router is wired into the ModelServer deployment from `AppArgs.routing` (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray._common.utils import import_attr

from cogvlm_ray.serve.app import MODEL_SERVER, build_app
from cogvlm_ray.serve.args import AppArgs, parse_args
from cogvlm_ray.serve.router import ROUTER_CLASS_PATH, ImageAffinityRouter


def model_router_config(args: dict):
    ingress = build_app(args)._bound_deployment
    model = next(getattr(a, "_bound_deployment", None) for a in ingress.init_args[2:])
    assert model.name == MODEL_SERVER
    return model._deployment_config.request_router_config


def test_image_affinity_is_the_default_and_gets_its_kwargs(tmp_path: Path):
    config = model_router_config({"model": "tiny-random", "metrics_dir": str(tmp_path),
                                  "routing": {"max_load_imbalance": 7, "max_affinity_candidates": 3}})  # fmt: skip
    assert config.request_router_class == ROUTER_CLASS_PATH
    assert import_attr(ROUTER_CLASS_PATH.replace(":", ".")) is ImageAffinityRouter
    assert config.request_router_kwargs == {"max_load_imbalance": 7, "max_affinity_candidates": 3,
                                            "metrics_dir": str(tmp_path), "ray_metrics": True}  # fmt: skip


def test_power_of_two_policy_keeps_serves_default_router(tmp_path: Path):
    config = model_router_config({"model": "tiny-random", "metrics_dir": str(tmp_path),
                                  "routing": {"policy": "power_of_two"}})  # fmt: skip
    assert config.request_router_class.endswith(":PowerOfTwoChoicesRequestRouter")


@pytest.mark.parametrize("routing", [{"policy": "random"}, {"max_load_imbalance": -1}, {"max_affinity_candidates": 0},
                                     {"imbalance": 2}])  # fmt: skip
def test_bad_routing_args_fail_at_start(routing: dict):
    with pytest.raises(ValueError, match="routing"):
        parse_args({"routing": routing})
    assert AppArgs().routing.policy == "image_affinity"
