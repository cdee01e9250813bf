"""EVA2-CLIP-E vision tower, 2x2 conv downsample and GLU adapter (`model.vision.*`).

Input: normalised pixels `[N, 3, S, S]`; output: `[N, (S/patch/2)^2 + 2, lm_hidden]` = boi,
the downsampled patch features, eoi (2306 rows at 1344). The tower is bidirectional,
post-sublayer normalised (LayerNorm on the sublayer output before the residual add), with no
final LayerNorm. Each stage is its own method so tests can check the official intermediates.
Submodules keep the official names; each forward moves its input to its own weights' device,
so accelerate may place the stages and layers on different devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cogvlm_ray.config import ModelConfig, VisionConfig


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (its stage lives there as a no-split unit)."""
    return next(module.parameters()).device


class PatchEmbedding(nn.Module):
    """Conv patchify, prepend cls, add the learned absolute position table (no interpolation)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(
            config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        self.cls_embedding = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values.to(self.proj.weight))  # [N, Dv, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, Dv], row-major grid
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    """Bidirectional attention; fused QKV output split as [3, heads, head_dim]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        qkv = self.query_key_value(x).view(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.dense(out.transpose(1, 2).reshape(n, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class VisionTransformerLayer(nn.Module):
    """`x + LN1(attn(x))`, then `x + LN2(mlp(x))`. A no-split unit for sharding."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionTransformerLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x.to(module_device(layer)))
        return x


class GLU(nn.Module):
    """Adapter: `linear_proj` -> LayerNorm(eps 1e-5) -> GELU -> `dense_4h_to_h(silu(gate) * dense_h_to_4h)`."""

    def __init__(self, in_features: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.dense_h_to_4h = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """The whole image path: pixels -> [boi, patch features, eoi] in the LM width."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        vision = config.vision_config
        self.grid_size = vision.grid_size
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = VisionTransformer(vision)
        self.linear_proj = GLU(vision.hidden_size, config.hidden_size, config.intermediate_size)
        self.conv = nn.Conv2d(vision.hidden_size, vision.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[N, 3, S, S]` -> `[N, g*g + 1, Dv]` (cls first)."""
        return self.patch_embedding(pixel_values.to(module_device(self.patch_embedding)))

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer output `[N, g*g + 1, Dv]` -> conv output `[N, Dv, g/2, g/2]` (cls dropped)."""
        n = x.shape[0]
        x = x[:, 1:].to(self.conv.weight.device)
        x = x.reshape(n, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)  # [N, Dv, g, g]
        return self.conv(x)

    def adapt(self, conv_out: torch.Tensor) -> torch.Tensor:
        """Conv output `[N, Dv, g/2, g/2]` -> GLU output `[N, (g/2)^2, D]`."""
        x = conv_out.flatten(2).transpose(1, 2)  # row-major
        return self.linear_proj(x.to(module_device(self.linear_proj)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.embed_patches(pixel_values))
        x = self.adapt(self.downsample(x))
        n = x.shape[0]
        boi = self.boi.to(x.device).expand(n, -1, -1)
        eoi = self.eoi.to(x.device).expand(n, -1, -1)
        return torch.cat((boi, x, eoi), dim=1)
