"""Random weights for a full-size or tiny CogVLM2 made in place on the target device (no checkpoint).

Used by the GPU benchmarks (`bench/gpu_check.py`, `bench/quant_gpu.py`): meta-device build, one
allocation in the target dtype, then each tensor filled with values at the scales of
`tiny.init_tensor`, so activations stay in a realistic range. Not a substitute for real weights
in any quality measurement.
"""

from __future__ import annotations

import numpy as np
import torch

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model.cogvlm import CogVLM2ForCausalLM
from cogvlm_ray.model.tiny import rotary_inv_freq


def init_parameter_(name: str, param: torch.Tensor, generator: torch.Generator) -> None:
    """In-place random values on the parameter's own device, same scales as `tiny.init_tensor`."""
    shape = tuple(param.shape)
    if name.endswith(".bias"):
        param.normal_(0.0, 0.1, generator=generator)
    elif "norm" in name.rsplit(".", 2)[-2]:  # RMSNorm / LayerNorm weight
        param.normal_(1.0, 0.1, generator=generator)
    elif name.endswith(("embed_tokens.weight", "position_embedding.weight")):
        param.normal_(0.0, 1.0, generator=generator)
    elif name.endswith(("cls_embedding", ".boi", ".eoi")):
        param.normal_(0.0, shape[-1] ** -0.5, generator=generator)
    elif name == "lm_head.weight":
        param.normal_(0.0, 6.0 * shape[1] ** -0.5, generator=generator)
    else:  # Linear [out, in] or Conv2d [out, in, kh, kw]
        param.normal_(0.0, float(np.prod(shape[1:])) ** -0.5, generator=generator)


@torch.no_grad()
def build_random_model(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int
) -> CogVLM2ForCausalLM:
    """Meta-device instantiation, cast on meta, `to_empty` on `device`, random fill in place."""
    with torch.device("meta"):
        model = CogVLM2ForCausalLM(config)
    model.to(dtype)  # on meta: free; the real allocation below is already in `dtype`
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        init_parameter_(name, param, generator)
    for name, buffer in model.named_buffers():
        if not name.endswith("rotary_emb.inv_freq"):
            raise RuntimeError(f"no initialiser for buffer {name}; extend build_random_model")
        buffer.copy_(rotary_inv_freq(config, buffer.dtype))
    return model.eval()
