"""Builders run inside a replica: the real engine (model + tokenizer on the replica's devices)
and the real preprocessor. Heavy imports (torch, transformers) happen here, at call time.

Device placement: Ray gives a model replica exactly `ray_actor_options.num_gpus` GPUs through
CUDA_VISIBLE_DEVICES, so the replica places the model on what it sees: one GPU -> "cuda:0",
several -> accelerate's "balanced" device map (decoder layers never split across devices),
none -> CPU. That keeps the Serve config the single source of truth for GPU counts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cogvlm_ray.serve.args import AppArgs

logger = logging.getLogger(__name__)


class NoGPUError(RuntimeError):
    """A model replica configured for GPUs sees none: fail the replica with an actionable message."""


def device_map_for(device: str, num_visible_gpus: int) -> str | None:
    """The `load_model(device_map=...)` value for this replica ("auto", "cuda" or "cpu" requested)."""
    if device == "cpu" or (device == "auto" and num_visible_gpus == 0):
        return None
    if num_visible_gpus == 0:
        raise NoGPUError(
            "device: cuda, but this ModelServer replica sees no GPU. Give the ModelServer deployment "
            "GPUs in the Serve config (ray_actor_options.num_gpus: 1 or more) on a cluster that has them, "
            "or run the CPU demo config (serve_config.local.yaml, device: cpu)."
        )
    return "cuda:0" if num_visible_gpus == 1 else "balanced"


def load_engine(args: AppArgs, model_dir: Path) -> Any:
    """Load the model on this replica's devices and wrap it in the continuous-batching engine."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from cogvlm_ray.engine import Engine
    from cogvlm_ray.model import load_model

    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device_map = device_map_for(args.device, num_gpus)
    logger.info(
        "loading %s (%s) with device_map=%s over %d visible GPU(s)",
        model_dir,
        args.dtype,
        device_map,
        num_gpus,
    )
    model = load_model(
        model_dir,
        dtype=args.dtype,
        device_map=device_map,
        quantization=None if args.quantization == "none" else args.quantization,
        quantize_vision=args.quantize_vision,
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    return Engine(model, tokenizer, args.engine)


def make_preprocessor(args: AppArgs, model_dir: Path) -> Any:
    """The CPU preprocessor (tokenizer + config read once from the checkpoint directory)."""
    from cogvlm_ray.preprocess import Preprocessor

    # The engine's context limit, so the early check refuses exactly what the engine would.
    return Preprocessor(model_dir, options=args.preprocess, max_model_len=args.engine.max_model_len)
