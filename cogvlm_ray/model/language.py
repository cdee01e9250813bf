"""The Llama-3 decoder with CogVLM2's visual expert, over a flat batch of tokens.

Every decoder layer has a language and a vision copy of the attention projections (QKV,
dense) and of the SwiGLU MLP. `ExpertRouting` says which rows of the flat batch use which
copy; when no row uses the vision expert its weights are not touched (decode steps). The
attention itself is shared and paged (`attention.py`). Attribute names follow the official
checkpoint so `loading.py` needs no renaming table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model.attention import ATTENTION_BACKENDS, AttentionMetadata
from cogvlm_ray.model.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """Official CogVLM2 RMSNorm: normalise and multiply by the weight in float32, then cast back."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(torch.float32) * x32).to(dtype)


@dataclass
class ExpertRouting:
    """Row indices of the flat batch per expert; `vision_index is None` means all rows are language.

    Build it on the host from what the runner already knows (`from_host_mask`, or
    `language_only()` for a decode step), so that the forward never asks the device whether a
    row is a vision token. `from_mask` (a device mask) is for callers without host masks; it
    syncs once per step.
    """

    language_index: torch.Tensor | None
    """int64 `[T_language]`, or None when every row is language."""
    vision_index: torch.Tensor | None
    """int64 `[T_vision]`, or None when every row is language."""
    _per_device: dict[torch.device, ExpertRouting] = field(default_factory=dict, repr=False)

    @classmethod
    def language_only(cls) -> ExpertRouting:
        return cls(language_index=None, vision_index=None)

    @classmethod
    def from_host_mask(cls, is_vision: list[bool], device: torch.device | str = "cpu") -> ExpertRouting:
        """From a host list (one flag per flat row): no device read; two small copies if any row is vision."""
        if not any(is_vision):
            return cls.language_only()
        vision = [i for i, v in enumerate(is_vision) if v]
        language = [i for i, v in enumerate(is_vision) if not v]
        return cls(
            language_index=torch.tensor(language, dtype=torch.long).to(device, non_blocking=True),
            vision_index=torch.tensor(vision, dtype=torch.long).to(device, non_blocking=True),
        )

    @classmethod
    def from_mask(cls, vision_expert_mask: torch.Tensor) -> ExpertRouting:
        """From a device mask: one host sync per step (not per layer) to learn whether any row is vision."""
        mask = vision_expert_mask.bool()
        if not bool(mask.any()):
            return cls.language_only()
        return cls(language_index=(~mask).nonzero().squeeze(1), vision_index=mask.nonzero().squeeze(1))

    @property
    def is_language_only(self) -> bool:
        return self.vision_index is None

    def to(self, device: torch.device) -> ExpertRouting:
        if self.is_language_only or self.vision_index.device == device:
            return self
        if device not in self._per_device:
            self._per_device[device] = ExpertRouting(
                self.language_index.to(device), self.vision_index.to(device)
            )
        return self._per_device[device]


def route(
    x: torch.Tensor, routing: ExpertRouting, language: nn.Module, vision: nn.Module, out_features: int
) -> torch.Tensor:
    """Apply `language` or `vision` row-wise by `routing`; x `[T, in]` -> `[T, out_features]`."""
    if routing.is_language_only:
        return language(x)
    out = x.new_empty(x.shape[0], out_features)
    if routing.language_index.numel():
        out.index_copy_(0, routing.language_index, language(x.index_select(0, routing.language_index)))
    out.index_copy_(0, routing.vision_index, vision(x.index_select(0, routing.vision_index)))
    return out


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.language_mlp = MLP(config.hidden_size, config.intermediate_size)
        self.vision_mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        return route(x, routing, self.language_mlp, self.vision_mlp, self.hidden_size)


class VisionExpertAttention(nn.Module):
    """GQA self-attention with per-expert QKV (vision QKV has a bias) and output projections."""

    def __init__(self, config: ModelConfig, attention_backend: str = "sdpa"):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_multi_query_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.scale = self.head_dim**-0.5
        self.attention_backend = attention_backend
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta, config.exact_rotary_positions)
        self.vision_expert_query_key_value = nn.Linear(config.hidden_size, self.qkv_size, bias=True)
        self.vision_expert_dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(config.hidden_size, self.qkv_size, bias=False)
        self.language_expert_dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        routing: ExpertRouting,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = route(
            x,
            routing,
            self.language_expert_query_key_value,
            self.vision_expert_query_key_value,
            self.qkv_size,
        )
        # [T, (H + 2 Hkv) * D] -> q [T, H, D], k / v [T, Hkv, D]; columns are [Q | K | V], head-major.
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q = qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        cos, sin = self.rotary_emb.cos_sin(positions, x.dtype)
        q = RotaryEmbedding.rotate(q, cos, sin)
        k = RotaryEmbedding.rotate(k, cos, sin)
        k_cache, v_cache = kv_cache
        backend = ATTENTION_BACKENDS[self.attention_backend]
        backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        attn = backend.attend(q, k_cache, v_cache, meta, self.scale)
        attn = attn.reshape(num_tokens, self.hidden_size)
        return route(attn, routing, self.language_expert_dense, self.vision_expert_dense, self.hidden_size)


class CogVLMDecoderLayer(nn.Module):
    """Pre-norm layer: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`. A no-split unit for sharding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = VisionExpertAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionExpertMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        routing: ExpertRouting,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, routing, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x), routing)
