"""The engine on the golden tiny CogVLM2 with `attention_backend="triton"` (interpreted on CPU).

Greedy tokens must equal the official goldens exactly, through the Triton decode, varlen
prefill and KV-write kernels, with batching and with chunked prefill that splits image spans.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.engine import Engine, EngineConfig, SamplingParams
from cogvlm_ray.model import load_model
from tests.triton_interpreter import kernel_device
from tests.unit.engine.fixture_prompts import CASES, load_case


@pytest.fixture(scope="module")
def device():
    with kernel_device() as device:
        yield device


@pytest.fixture(scope="module")
def model(fixture_dir, device):
    return load_model(
        fixture_dir, dtype=torch.float32, device_map=None if device.type == "cpu" else str(device)
    )


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


async def _generate(engine: Engine, prompts: dict, max_tokens: int) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    streams = {name: engine.add_request(prompt, params, name) for name, prompt in prompts.items()}

    async def ids(stream) -> list[int]:
        return [t async for out in stream for t in out.new_token_ids]

    results = await asyncio.gather(*(ids(s) for s in streams.values()))
    await engine.shutdown()
    return dict(zip(streams, results, strict=True))


def test_triton_greedy_batch_matches_the_official_tokens(model, tokenizer, fixture_dir):
    """All five cases at once, prefilled in chunks of <= 24 tokens (image spans split across
    steps, chunks after cached context, prefill chunks next to decodes), then decoded together.
    One run: the interpreter costs ~0.2 s of CPU per kernel launch."""
    cases = {name: load_case(fixture_dir, name) for name in CASES}
    config = EngineConfig(
        max_kv_tokens=512, block_size=4, max_num_batched_tokens=24, max_num_seqs=5, attention_backend="triton"
    )
    engine = Engine(model, tokenizer, config)
    assert engine.attention_backend == "triton"
    got = asyncio.run(asyncio.wait_for(_generate(engine, {n: c[0] for n, c in cases.items()}, 12), 300))
    for name in CASES:
        assert got[name] == cases[name][1], name
