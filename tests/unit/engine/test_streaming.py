"""UTF-8 safe streaming through the whole engine, on a tiny random checkpoint whose tokenizer
has CJK / emoji byte pieces (`make_tiny_checkpoint(preset="tiny")`)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.engine import Engine, EngineConfig, SamplingParams
from cogvlm_ray.model import load_model
from cogvlm_ray.model.tiny import make_tiny_checkpoint
from tests.unit.engine.fixture_prompts import text_prompt

TEXT = "你好，世界。猫が窓のそばに座っています。🐱🚀 café"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-cjk"), preset="tiny", seed=3)
    return load_model(directory, dtype=torch.float32), PreTrainedTokenizerFast.from_pretrained(str(directory))


def generate(model, tokenizer, prompt_ids: list[int], params: SamplingParams):
    async def main():
        engine = Engine(model, tokenizer, EngineConfig(max_kv_tokens=1024))
        outputs = [o async for o in engine.add_request(text_prompt(prompt_ids), params, "r")]
        await engine.shutdown()
        return outputs

    return asyncio.run(asyncio.wait_for(main(), timeout=120))


def test_scripted_multibyte_answer_streams_whole_characters(checkpoint, monkeypatch):
    model, tokenizer = checkpoint
    script = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(tokenizer.decode(script[: i + 1]).endswith("\ufffd") for i in range(len(script))), (
        "the script must contain tokens that end inside a character"
    )
    real = model.compute_logits
    step = iter(range(len(script)))

    def scripted(hidden):  # the model "wants" to say TEXT, one token per step
        logits = torch.zeros_like(real(hidden))
        logits[:, script[next(step)]] = 1.0
        return logits

    monkeypatch.setattr(model, "compute_logits", scripted)
    outputs = generate(
        model,
        tokenizer,
        tokenizer.encode("Say hello."),
        SamplingParams(max_tokens=len(script), temperature=0),
    )
    assert [t for o in outputs for t in o.new_token_ids] == script
    assert all("\ufffd" not in o.new_text for o in outputs)
    assert any(o.new_text == "" and o.new_token_ids for o in outputs), "some deltas waited for a character"
    assert "".join(o.new_text for o in outputs) == TEXT


def test_random_sampled_stream_joins_to_the_one_shot_decode(checkpoint):
    model, tokenizer = checkpoint
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=5, ignore_eos=True)
    outputs = generate(model, tokenizer, tokenizer.encode(TEXT), params)
    ids = [t for o in outputs for t in o.new_token_ids]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    streamed = ""
    for o in outputs:
        streamed += o.new_text
        assert full.startswith(streamed), "an emitted delta was never revised"
    assert streamed == full and len(ids) == 48
