"""Continuous-batching generation engine for CogVLM2 (plain Python + torch; no Ray, no HTTP).

Data path (each arrow is one dataclass, defined in one place):

    HTTP request (api/)            OpenAI pydantic model -> SamplingParams (contracts.py)
    -> PreparedPrompt              contracts.py: ids, token types, uint8 image, image hash
    -> Request                     engine/request.py: mutable per-request state (num_computed_tokens,
                                   output ids, status); queued by Engine.add_request
    -> SchedulerOutput             engine/scheduler.py: who runs this step and how many tokens each
                                   (decodes + prefill chunks under a token budget, KV blocks allocated)
    -> tensors                     engine/runner.py: flat ids / positions / expert mask / image rows +
                                   AttentionMetadata -> model.forward_flat -> last-token logits
    -> sampled ids (+ logprobs)    engine/sampler.py (batched; ops in sampling_ops.py, device token
                                   counts in token_counts.py) -> RunnerOutput (scheduler.py)
    -> RequestOutput               contracts.py, made by engine/outputs.py: scheduler.update_from_output + incremental
                                   detokenizer (stop strings) -> per-request asyncio queue
    -> OpenAI chunk                api/ (not here)

Structured output (engine/structured/): a SamplingParams.structured spec is compiled off the loop
into a grammar; its matcher masks the request's logits row each step (one bitmask, applied by the
sampler) and advances on each sampled token.

Modules: config (EngineConfig), kv_cache (paged blocks + tensors), image_cache (vision-feature
LRU), validation, token_text (logprob token strings / bytes), engine (async API and the step
loop; a request with n choices is n Requests sharing one stream). Stats: engine/stats.py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogvlm_ray.contracts import RequestOutput, SamplingParams
    from cogvlm_ray.engine.config import EngineConfig
    from cogvlm_ray.engine.engine import Engine
    from cogvlm_ray.engine.stats import EngineStats

# Exports resolve lazily: importing `cogvlm_ray.engine` for a type must not
# pay for torch (~180 MiB per replica) by importing the engine package's heavy modules.
_EXPORTS = {
    "Engine": "cogvlm_ray.engine.engine",
    "EngineConfig": "cogvlm_ray.engine.config",
    "EngineStats": "cogvlm_ray.engine.stats",
    "RequestOutput": "cogvlm_ray.contracts",
    "SamplingParams": "cogvlm_ray.contracts",
}

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
