"""Rotary position embedding of the CogVLM2 decoder (GPT-NeoX rotate-half, base 500000).

Two numerics, chosen by `ModelConfig.exact_rotary_positions`:

* official (default): positions are cast to the dtype of the checkpoint's `inv_freq` buffer,
  and the angle and cos/sin are computed in that dtype, as the official rotary class does
  (`pos_idx_in_fp32=False`). In bfloat16 this rounds positions above 256 to the bf16 grid and
  rounds the angle; in float32 it equals the textbook formula.
* exact: float32 positions, float32 inverse frequencies and angles (HF-Llama style).

The rotation itself is done in the activation dtype.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds `inv_freq` (a checkpoint buffer, `[head_dim / 2]`) and rotates q/k by position."""

    def __init__(self, head_dim: int, base: float, exact_positions: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.exact_positions = exact_positions
        self.register_buffer("inv_freq", self.textbook_inv_freq(), persistent=True)

    def textbook_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """`1 / base^(2j / head_dim)` in float32 (used when a checkpoint omits the buffer)."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponent)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[T, head_dim / 2]` in `dtype` for integer positions `[T]`."""
        if self.exact_positions:
            angle = positions.to(torch.float32)[:, None] * self.textbook_inv_freq(positions.device)[None, :]
        else:
            inv_freq = self.inv_freq
            angle = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
        return angle.cos().to(dtype), angle.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `[T, heads, head_dim]`; pairs dim i with i + head_dim/2: `[x1 cos - x2 sin, x2 cos + x1 sin]`."""
        x1, x2 = x.chunk(2, dim=-1)
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
