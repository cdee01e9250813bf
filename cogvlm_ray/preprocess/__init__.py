"""CPU preprocessing: OpenAI messages + images -> PreparedPrompt (no Ray, no weights).

options.py       PreprocessOptions: byte/pixel caps, opt-in http(s) and local files
sources.py       image_url -> encoded bytes (data: URLs, local files) ...
http_fetch.py    ... and http(s) with allow-list, SSRF refusal, timeouts, byte cap
images.py        bytes -> safe decode -> RGB -> bicubic S x S uint8 [3, S, S] + hash
messages.py      OpenAI messages -> Conversation (query, history, system, image urls) and the text rules
prompt.py        templates, build_prompt_ids
preprocessor.py  Preprocessor.prepare(conversation, max_tokens=..., template_version=...)

Depends only on config, errors and contracts, and never imports torch: the float CLIP
normalisation is the vision tower's (`model/pixels.py`), the official tensor-returning
`build_conversation_input_ids` is the HF drop-in's (`cogvlm_ray/hf/prompt.py`).
(PreparedPrompt, the dataclass that crosses to the model replica, is in cogvlm_ray/contracts.py)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogvlm_ray.contracts import PreparedPrompt
    from cogvlm_ray.preprocess.images import DecodedImage, decode_image
    from cogvlm_ray.preprocess.options import PreprocessOptions
    from cogvlm_ray.preprocess.preprocessor import Preprocessor
    from cogvlm_ray.preprocess.prompt import build_prompt_ids

# Exports resolve lazily, so importing the package costs nothing until a name is used.
_EXPORTS = {
    "DecodedImage": "cogvlm_ray.preprocess.images",
    "decode_image": "cogvlm_ray.preprocess.images",
    "PreprocessOptions": "cogvlm_ray.preprocess.options",
    "PreparedPrompt": "cogvlm_ray.contracts",
    "Preprocessor": "cogvlm_ray.preprocess.preprocessor",
    "build_prompt_ids": "cogvlm_ray.preprocess.prompt",
}

__all__ = [
    "DecodedImage",
    "PreparedPrompt",
    "PreprocessOptions",
    "Preprocessor",
    "build_prompt_ids",
    "decode_image",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
