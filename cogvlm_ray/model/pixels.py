"""The vision tower's input contract: uint8 [3, S, S] pixels -> CLIP-normalised float tensor.

Owns `normalize_image` (run by the model replica on the device, bit-identical to the official
float32 CPU transform), the CLIP statistics, and `official_pixel_values`, the reference
transform tests and benchmarks compare against. Decoding and resizing happen earlier, on the
preprocessing replica (`preprocess/images.py`, no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # Pillow is imported where the reference transform runs: the engine needs no Pillow
    from PIL import Image

#: OpenAI CLIP statistics used by the official transform.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def normalize_image(
    pixels: np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [3, S, S] (or [B, 3, S, S]) -> CLIP-normalised tensor, computed in float32.

    Same operations in the same order as torchvision's ToTensor + Normalize (divide by 255,
    subtract the mean, divide by the std, all float32), so the result is bit-identical to the
    official CPU transform; IEEE float32 division is exact-rounded on CUDA too. The cast to
    `dtype` (e.g. bf16 for the model) happens last, as the official demos cast after the
    transform. The uint8 upload is 4x smaller than shipping float32.
    """
    if isinstance(pixels, np.ndarray):
        if pixels.dtype != np.uint8:
            raise ValueError(f"normalize_image expects uint8 pixels, got {pixels.dtype}")
        # Arrays from Ray's object store are read-only; torch needs a writable buffer.
        tensor = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
    else:
        if pixels.dtype != torch.uint8:
            raise ValueError(f"normalize_image expects uint8 pixels, got {pixels.dtype}")
        tensor = pixels
    if tensor.dim() not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"normalize_image expects [3, S, S] or [B, 3, S, S], got {tuple(tensor.shape)}")
    tensor = tensor.to(device=device, non_blocking=True)
    x = tensor.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)


def official_pixel_values(rgb: Image.Image, image_size: int) -> torch.Tensor:
    """Reference: the official float32 transform on CPU (Resize bicubic, ToTensor, Normalize).

    Used by tests and the benchmark as the baseline we must match bit for bit.
    """
    from PIL import Image

    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)  # Resize (PIL input)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()  # ToTensor: [3, S, S]
    x = x.to(torch.float32).div(255)
    x = x.clone()  # Normalize(inplace=False) works on a copy
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)
