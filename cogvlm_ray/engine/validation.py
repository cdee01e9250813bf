"""Checks that a PreparedPrompt and SamplingParams are something the model can run (400s otherwise).

The preprocessing replica builds prompts correctly; these checks guard the engine against
other callers (tests, benchmarks, a future client) sending inconsistent ids, types or pixels.
"""

from __future__ import annotations

import numpy as np

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.contracts import PreparedPrompt, SamplingParams
from cogvlm_ray.errors import InvalidRequestError


def validate_prompt(prepared: PreparedPrompt, model_config: ModelConfig) -> None:
    """Raise InvalidRequestError unless ids, token types and the image agree with the model."""
    ids, types = prepared.input_ids, prepared.token_type_ids
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="messages")
    if len(ids) != len(types):
        raise InvalidRequestError(f"{len(ids)} token ids but {len(types)} token types", param="messages")
    if min(ids) < 0 or max(ids) >= model_config.vocab_size:
        raise InvalidRequestError(f"token ids must be in [0, {model_config.vocab_size})", param="messages")
    if any(t not in (0, 1) for t in types):
        raise InvalidRequestError("token types must be 0 (language) or 1 (vision)", param="messages")
    num_vision = sum(types)
    if prepared.image is None:
        if num_vision:
            raise InvalidRequestError("vision token types given without an image", param="messages")
        return
    size = model_config.vision_config.image_size
    image = prepared.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (3, size, size):
        raise InvalidRequestError(
            f"the image must be a uint8 array of shape (3, {size}, {size})", param="messages"
        )
    if num_vision != model_config.num_image_tokens:
        raise InvalidRequestError(
            f"the prompt has {num_vision} vision positions, the model needs {model_config.num_image_tokens}",
            param="messages",
        )
    if not prepared.image_hash:
        raise InvalidRequestError("an image prompt needs its image_hash", param="messages")


def validate_sampling_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise InvalidRequestError for token ids outside the vocabulary (logit_bias, stop_token_ids):
    they index the logits, so a bad one would fail the whole step, not just this request."""
    if any(not 0 <= int(t) < vocab_size for t, _ in params.logit_bias):
        raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size})", param="logit_bias")
    if any(not 0 <= int(t) < vocab_size for t in params.stop_token_ids):
        raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab_size})", param="stop_token_ids")
