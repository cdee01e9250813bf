"""The Hugging Face drop-in surface, above the core model and the prompt builder.

model.py   CogVLM2HFForCausalLM: the core model + transformers' GenerationMixin (official
           forward / generate / from_pretrained), with a growable paged GenerationCache
prompt.py  the official build_conversation_input_ids (tensors and normalised pixels)

The serving engine never imports this package.
"""

from cogvlm_ray.hf.model import CogVLM2HFForCausalLM
from cogvlm_ray.hf.prompt import build_conversation_input_ids

__all__ = ["CogVLM2HFForCausalLM", "build_conversation_input_ids"]
