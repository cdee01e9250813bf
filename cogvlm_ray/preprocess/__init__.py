"""CPU preprocessing: OpenAI messages + images -> PreparedPrompt (no Ray, no weights).

options.py       PreprocessOptions: byte/pixel caps, opt-in http(s) and local files
sources.py       image_url -> encoded bytes (data: URLs, local files) ...
http_fetch.py    ... and http(s) with allow-list, SSRF refusal, timeouts, byte cap
images.py        bytes -> safe decode -> RGB -> bicubic S x S uint8 [3, S, S] + hash;
                 normalize_image (run by the model replica, float32, official numerics)
messages.py      OpenAI messages -> (query, history, system, image urls) and the text rules
prompt.py        templates, build_prompt_ids, official build_conversation_input_ids
preprocessor.py  Preprocessor.prepare(messages, max_tokens=..., template_version=...)
(PreparedPrompt, the dataclass that crosses to the model replica, is in cogvlm_ray/contracts.py)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogvlm_ray.contracts import PreparedPrompt
    from cogvlm_ray.preprocess.images import (
        CLIP_MEAN,
        CLIP_STD,
        DecodedImage,
        decode_image,
        normalize_image,
    )
    from cogvlm_ray.preprocess.options import PreprocessOptions
    from cogvlm_ray.preprocess.preprocessor import Preprocessor
    from cogvlm_ray.preprocess.prompt import build_conversation_input_ids, build_prompt_ids

# Exports resolve lazily, so importing one name does not import torch and transformers.
_EXPORTS = {
    "CLIP_MEAN": "cogvlm_ray.preprocess.images",
    "CLIP_STD": "cogvlm_ray.preprocess.images",
    "DecodedImage": "cogvlm_ray.preprocess.images",
    "decode_image": "cogvlm_ray.preprocess.images",
    "normalize_image": "cogvlm_ray.preprocess.images",
    "PreprocessOptions": "cogvlm_ray.preprocess.options",
    "PreparedPrompt": "cogvlm_ray.contracts",
    "Preprocessor": "cogvlm_ray.preprocess.preprocessor",
    "build_conversation_input_ids": "cogvlm_ray.preprocess.prompt",
    "build_prompt_ids": "cogvlm_ray.preprocess.prompt",
}

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DecodedImage",
    "PreparedPrompt",
    "PreprocessOptions",
    "Preprocessor",
    "build_conversation_input_ids",
    "build_prompt_ids",
    "decode_image",
    "normalize_image",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
