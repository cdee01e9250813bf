"""Engine test factories: requests and schedulers driven by hand-built runner outputs (vLLM style)."""

from __future__ import annotations

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.engine.config import EngineConfig
from cogvlm_ray.engine.kv_cache import BlockManager
from cogvlm_ray.engine.request import Request
from cogvlm_ray.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput

EOS = 99


def make_request(request_id: str, num_prompt_tokens: int, **params) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=[1 + (i % 50) for i in range(num_prompt_tokens)],
        token_type_ids=[0] * num_prompt_tokens,
        sampling_params=SamplingParams(**{"temperature": 0.0, "max_tokens": 8, **params}),
    )


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, max_model_len: int = 1024, **config
) -> Scheduler:
    engine_config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **config)
    return Scheduler(engine_config, BlockManager(num_blocks, block_size), (EOS,), max_model_len)


def sample_all(out: SchedulerOutput, token_id: int = 7) -> RunnerOutput:
    """The runner's answer: `token_id` for every sequence that completes its known tokens."""
    return RunnerOutput({item.request.request_id: token_id for item in out.scheduled if item.samples})
