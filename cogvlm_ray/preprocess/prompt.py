"""Prompt templates and token ids, as the official `build_conversation_input_ids` makes them.

Owns: the three templates (spec section 5), `build_prompt_ids` (the list-based core used by the
preprocessing replica) and `build_conversation_input_ids` with the official signature and
return dict (used by `CogVLM2ForCausalLM.build_conversation_input_ids`, which passes
`config=self.model_config`). The image placeholder id is `config.image_token_id` (the
checkpoint's pad_token_id, 128002 for the real model) and the number of image positions is
`config.num_image_tokens` (2306 at 1344); nothing is hard-coded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cogvlm_ray.config import TEMPLATE_VERSIONS, ModelConfig
from cogvlm_ray.contracts import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from cogvlm_ray.errors import InvalidRequestError
from cogvlm_ray.preprocess.images import normalize_image, resize_to_uint8, to_rgb

_ANSWER_FORMATS = {"chat": "Answer:", "vqa": "Short answer:"}


def resolve_template(template_version: str | None, config: ModelConfig) -> str:
    """The request's template, or the model's configured default; 400 on an unknown name."""
    template = template_version or config.template_version
    if template not in TEMPLATE_VERSIONS:
        raise InvalidRequestError(
            f"unknown template_version {template!r}; expected one of {', '.join(TEMPLATE_VERSIONS)}",
            param="template_version",
        )
    return template


def history_to_prompt(template_version: str, history: Sequence[tuple[str, str]], query: str) -> str:
    """Render the text of a conversation. `base` ignores history, as the official code does."""
    if template_version == "base":
        return query
    answer_format = _ANSWER_FORMATS.get(template_version)
    if answer_format is None:
        raise InvalidRequestError(
            f"unknown template_version {template_version!r}; expected one of {', '.join(TEMPLATE_VERSIONS)}",
            param="template_version",
        )
    prompt = "".join(f"Question: {q} {answer_format} {r}\n" for q, r in history)
    return prompt + f"Question: {query} {answer_format}"


def build_prompt_ids(
    tokenizer: Any,
    config: ModelConfig,
    *,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    has_image: bool = False,
    template_version: str | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids): [bos] + [placeholder] * num_image_tokens + text ids.

    Does not touch the tokenizer's state (safe to share across threads).
    """
    template = resolve_template(template_version, config)
    text = history_to_prompt(template, history or [], query)
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    input_ids = [bos_id]
    token_type_ids = [LANGUAGE_TOKEN_TYPE]
    if has_image:
        num_image_tokens = config.num_image_tokens
        input_ids += [config.image_token_id] * num_image_tokens
        token_type_ids += [VISION_TOKEN_TYPE] * num_image_tokens
    text_ids = list(tokenizer.encode(text, add_special_tokens=False))
    input_ids += text_ids
    token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
    return input_ids, token_type_ids


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
