"""The official `build_conversation_input_ids`: same signature, same dict of tensors.

Used by `CogVLM2HFForCausalLM.build_conversation_input_ids` (which passes
`config=self.model_config`). The ids come from `preprocess.prompt.build_prompt_ids` (the
serving path's builder), the pixels from `preprocess.images` + `model.pixels.normalize_image`,
so the drop-in path and the server build identical prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.contracts import LANGUAGE_TOKEN_TYPE
from cogvlm_ray.errors import InvalidRequestError
from cogvlm_ray.model.pixels import normalize_image
from cogvlm_ray.preprocess.images import resize_to_uint8, to_rgb
from cogvlm_ray.preprocess.prompt import build_prompt_ids


def build_conversation_input_ids(
    tokenizer: Any,
    *,
    query: str,
    history: list[tuple[str, str]] | None = None,
    images: list[Image.Image | np.ndarray | torch.Tensor] | None = None,
    template_version: str | None = None,
    answer: str | None = None,
    config: ModelConfig,
) -> dict[str, Any]:
    """The official builder: same arguments, same dict (`input_ids`, `token_type_ids`,
    `attention_mask`: 1-D int64 tensors; `images`: None or a list with one float32 [3, S, S]
    normalised tensor; `labels`: None, or -100 on the prompt and answer ids + eos after it).

    `images` holds at most one PIL image (converted to RGB here; the official code expects the
    caller to have done it) or an already resized uint8 [3, S, S] array/tensor. Like the
    official code, it sets `tokenizer.pad_token_id` to the placeholder id when an image is
    given (the demos rely on it for padding).
    """
    if images is not None and len(images) > 1:
        raise InvalidRequestError("CogVLM2 takes at most one image per conversation")
    has_image = bool(images)
    pixel_values: list[torch.Tensor] | None = None
    if has_image:
        pixel_values = [_official_image_tensor(images[0], config.vision_config.image_size)]
        tokenizer.pad_token_id = config.image_token_id
    input_ids, token_type_ids = build_prompt_ids(
        tokenizer,
        config,
        query=query,
        history=history,
        has_image=has_image,
        template_version=template_version,
    )
    labels = None
    if answer is not None:
        answer_ids = list(tokenizer.encode(answer, add_special_tokens=False)) + [tokenizer.eos_token_id]
        labels = torch.tensor([-100] * len(input_ids) + answer_ids, dtype=torch.long)
        input_ids += answer_ids
        token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(answer_ids)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
        "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
        "images": pixel_values,
        "labels": labels,
    }


def _official_image_tensor(image: Image.Image | np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    if isinstance(image, Image.Image):
        pixels = resize_to_uint8(to_rgb(image), image_size)
    else:
        pixels = image
        if tuple(pixels.shape) != (3, image_size, image_size):
            raise ValueError(
                f"image array must be uint8 [3, {image_size}, {image_size}], got {tuple(pixels.shape)}"
            )
    return normalize_image(pixels)
