"""Prompt templates and token ids, as the official `build_conversation_input_ids` makes them.

Owns: the three templates and `build_prompt_ids`, the list-based core used by the
preprocessing replica and by the Hugging Face drop-in builder (`cogvlm_ray/hf/prompt.py`,
which adds tensors and pixels). The image placeholder id is `config.image_token_id` (the
checkpoint's pad_token_id, 128002 for the real model) and the number of image positions is
`config.num_image_tokens` (2306 at 1344); nothing is hard-coded. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cogvlm_ray.config import TEMPLATE_VERSIONS, ModelConfig
from cogvlm_ray.contracts import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from cogvlm_ray.errors import InvalidRequestError

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
