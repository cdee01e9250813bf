"""Native CogVLM2 in plain torch.

`layout.py` (position ids, expert mask), `rotary.py`, `attention.py` (paged KV, metadata),
`pixels.py` (CLIP normalisation: the vision tower's input contract), `vision.py`
(EVA2-CLIP-E + adapter), `language.py` (visual-expert decoder), `cogvlm.py`
(`CogVLM2ForCausalLM`: the engine contract), `loading.py` (strict streaming safetensors
loader, checkpoint stop ids), `sharding.py` (accelerate device maps). Depends only on
`config` and `contracts`; the Hugging Face drop-in subclass is `cogvlm_ray.hf`.
"""

from cogvlm_ray.model.attention import AttentionMetadata
from cogvlm_ray.model.cogvlm import CogVLM2ForCausalLM
from cogvlm_ray.model.loading import CheckpointError, load_model

__all__ = ["AttentionMetadata", "CheckpointError", "CogVLM2ForCausalLM", "load_model"]
