"""The Serve config the cluster scenarios deploy: production's shape on the tiny model.

Like `serve_config.yaml`, it is a `serve deploy` document whose `args:` validate against
`AppArgs`, and the `ModelServer` asks for `num_gpus: 1`, so each replica needs a GPU worker
node, which the fake autoscaler launches. Differences from production, for a 2-core box: the tiny random
model with `device: cpu`, fractional CPUs, a small batch (`max_num_seqs`), and short
autoscaling delays so a scale-up and a scale-down fit in a test.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APP_NAME = "cogvlm"
MODEL_NAME = "cogvlm2-tiny"
API_KEY = "cluster-key"
HEAD_RESOURCE = "cluster_head"
"""A custom resource only the head has: keeps the ingress and preprocessing on the head (as
KubeRay keeps them off the GPU pods), so a GPU node runs nothing but its model replica."""


@dataclass(frozen=True)
class ClusterAppSpec:
    """The knobs the scenarios vary."""

    http_port: int
    work_dir: Path
    max_num_seqs: int = 4
    max_queued_requests: int = 4
    """Small, so a burst meets the ingress's 429 at one replica and not at max_replicas."""
    min_replicas: int = 1
    max_replicas: int = 3
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 6.0
    look_back_period_s: float = 2.0
    metrics_interval_s: float = 0.5
    default_max_tokens: int = 16
    stream_interval_s: float = 0.0
    shutdown_timeout_s: float = 30.0
    model_num_cpus: float = 0.25
    max_surge_percent: int = 50


def serve_config(spec: ClusterAppSpec) -> dict[str, Any]:
    """The `serve deploy` document (ServeDeploySchema) for `spec`."""
    args = {
        "model": "tiny-random",
        "served_model_name": MODEL_NAME,
        "dtype": "float32",
        "device": "cpu",
        "cache_dir": str(spec.work_dir / "models"),
        "engine": {
            "max_num_seqs": spec.max_num_seqs,
            "max_kv_tokens": 16384,
            "image_cache_bytes": 1 << 24,
        },
        "max_queued_requests": spec.max_queued_requests,
        "api_key": API_KEY,
        "request_timeout_s": 120,
        "default_max_tokens": spec.default_max_tokens,
        "metrics_dir": str(spec.work_dir / "prom"),
        "stream_interval_s": spec.stream_interval_s,
        "shutdown_timeout_s": spec.shutdown_timeout_s,
        # min_replicas may be 0 in other setups; here one replica always runs.
        "fail_fast_without_replicas": True,
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": spec.http_port},
        "logging_config": {"encoding": "TEXT", "log_level": "WARNING"},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "cogvlm_ray.serve.app:build_app",
                "args": args,
                "deployments": [
                    {
                        "name": "Preprocessor",
                        "num_replicas": 1,
                        "max_surge_percent": 100,
                        "ray_actor_options": {"num_cpus": 0.25, "resources": {HEAD_RESOURCE: 0.01}},
                    },
                    {
                        "name": "ModelServer",
                        # Longer than shutdown_timeout_s: Serve waits for ongoing requests first.
                        "graceful_shutdown_timeout_s": spec.shutdown_timeout_s + 5,
                        "graceful_shutdown_wait_loop_s": 0.5,
                        # A rolling update starts the new replica (on a new GPU node) before it
                        # stops an old one, so a one-replica deployment never has zero.
                        "max_surge_percent": spec.max_surge_percent,
                        "health_check_period_s": 2,
                        "health_check_timeout_s": 10,
                        "autoscaling_config": {
                            "min_replicas": spec.min_replicas,
                            "max_replicas": spec.max_replicas,
                            "target_ongoing_requests": spec.target_ongoing_requests,
                            "upscale_delay_s": spec.upscale_delay_s,
                            "downscale_delay_s": spec.downscale_delay_s,
                            "look_back_period_s": spec.look_back_period_s,
                            "metrics_interval_s": spec.metrics_interval_s,
                        },
                        "ray_actor_options": {"num_cpus": spec.model_num_cpus, "num_gpus": 1},
                    },
                    {
                        "name": "Ingress",
                        "num_replicas": 1,
                        "max_surge_percent": 100,
                        "graceful_shutdown_timeout_s": 60,
                        "ray_actor_options": {"num_cpus": 0.25, "resources": {HEAD_RESOURCE: 0.01}},
                    },
                ],
            }
        ],
    }


def with_changes(
    config: dict[str, Any], *, default_max_tokens: int, engine: dict[str, Any]
) -> dict[str, Any]:
    """A copy of `config` with new app args (what a rolling update ships)."""
    out = copy.deepcopy(config)
    args = out["applications"][0]["args"]
    args["default_max_tokens"] = default_max_tokens
    args["engine"] = {**args["engine"], **engine}
    return out
