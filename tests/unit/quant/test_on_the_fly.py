"""On-the-fly quantization of the float fixture: layers, numerics, and that the engine, the image
cache and device maps work unchanged with quantized layers.

Quality bounds come from bench/quant_quality.py on this fixture (docs/BENCHMARKS.md) with a margin;
they compare modes on a tiny random model, not the real model's quality.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerFast

# The `quant` extra: without it this module is skipped, and the rest of the suite still collects.
bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("torchao")

from cogvlm_ray.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from cogvlm_ray.hf import CogVLM2HFForCausalLM  # noqa: E402
from tests.unit.engine.fixture_prompts import load_case as load_prompt  # noqa: E402

from .conftest import CASES, FIXTURE_DIR, PAD_ID, agreement, all_logits, case_inputs, golden_logits  # noqa: E402

#: method -> (layer type check, min top-1, max mean KL); measured: see the module docstring.
BOUNDS = {
    "bnb-4bit": (0.40, 1.3),  # measured 0.497 / 0.992
    "bnb-8bit": (0.85, 0.02),  # measured 0.926 / 0.0064
    "int8-wo": (0.95, 0.01),  # measured 0.993 / 0.0026
    "int8-dq": (0.90, 0.02),  # measured 0.960 / 0.0078
}


def quantized(method: str, **kwargs):
    return CogVLM2HFForCausalLM.from_pretrained(
        FIXTURE_DIR, dtype=torch.float32, quantization=method, **kwargs
    )


def is_quantized(layer: nn.Module) -> bool:
    return (
        isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or type(layer.weight) is not nn.Parameter
    )


@pytest.mark.parametrize("method", list(BOUNDS))
def test_every_linear_but_lm_head_is_quantized_and_close_to_float(method: str, cases) -> None:
    model = quantized(method)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert not is_quantized(linears.pop("lm_head"))
    assert linears and all(is_quantized(m) for m in linears.values()), [
        n for n, m in linears.items() if not is_quantized(m)
    ]
    assert all(device.type == "cpu" and dtype == torch.float32 for device, dtype in model.kv_cache_layout())
    top1, kl = agreement(golden_logits(cases), all_logits(model, cases))
    min_top1, max_kl = BOUNDS[method]
    assert top1 >= min_top1 and kl <= max_kl, (method, top1, kl)


def test_bnb_4bit_layer_computes_the_dequantized_weight() -> None:
    """The only error is weight rounding: the layer equals a float matmul with its dequantized weight."""
    model = quantized("bnb-4bit")
    layer = model.model.layers[0].mlp.language_mlp.gate_proj
    state = layer.weight.quant_state
    dequantized = bnbf.dequantize_4bit(layer.weight.data, state, quant_type="nf4")
    original = (
        CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.float32)
        .model.layers[0]
        .mlp.language_mlp.gate_proj.weight
    )
    assert (dequantized - original).norm() / original.norm() < 0.1  # nf4, blocks of 64: measured 0.091
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # bitsandbytes' packed AVX512-bf16 CPU kernel (the default where the CPU has it) rounds
        # activations to bf16; its generic path computes in the float32 compute dtype.
        torch.testing.assert_close(layer(x), F.linear(x, dequantized), rtol=2e-2, atol=2e-2)
        generic = quantized("bnb-4bit").model.layers[0].mlp.language_mlp.gate_proj
        generic.support_avx512bf16_for_cpu = False
        torch.testing.assert_close(generic(x), F.linear(x, dequantized), rtol=1e-4, atol=1e-4)


def test_int8_wo_layer_computes_the_dequantized_weight() -> None:
    layer = quantized("int8-wo").model.layers[1].self_attn.vision_expert_query_key_value
    original = (
        CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.float32)
        .model.layers[1]
        .self_attn.vision_expert_query_key_value
    )
    dequantized = layer.weight.dequantize()
    assert (dequantized - original.weight).norm() / original.weight.norm() < 0.01
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, dequantized, original.bias), rtol=1e-4, atol=1e-4)


def test_keeping_the_vision_tower_float_helps_4bit_on_the_fixture(cases) -> None:
    model = quantized("bnb-4bit", quantize_vision=False)
    vision_linears = [
        m for n, m in model.named_modules() if n.startswith("model.vision.") and isinstance(m, nn.Linear)
    ]
    assert vision_linears and not any(is_quantized(m) for m in vision_linears)
    assert is_quantized(
        model.model.layers[0].self_attn.vision_expert_dense
    )  # the LM's vision expert is not the tower
    golden = golden_logits(cases)
    _, kl_all = agreement(golden, all_logits(quantized("bnb-4bit"), cases))
    _, kl_lm_only = agreement(golden, all_logits(model, cases))
    assert kl_lm_only < 0.5 * kl_all  # measured 0.291 vs 0.992


def test_explicit_device_map_gives_the_same_quantized_model(cases) -> None:
    device_map = {
        "model.embed_tokens": "cpu",
        "model.vision": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    sharded = CogVLM2HFForCausalLM.from_pretrained(
        FIXTURE_DIR, dtype=torch.float32, device_map=device_map, quantization="int8-wo"
    )
    assert sharded.hf_device_map == device_map
    some = {"chat_image": cases["chat_image"]}
    torch.testing.assert_close(
        all_logits(sharded, some), all_logits(quantized("int8-wo"), some), rtol=0, atol=0
    )


@pytest.mark.parametrize("method", ["bnb-4bit", "int8-wo"])
def test_engine_with_a_quantized_model_matches_its_own_generate(method: str, cases) -> None:
    """Continuous batching + paged KV + image cache run unchanged on quantized layers."""
    model = quantized(method)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(FIXTURE_DIR))
    expected = {}
    for name in CASES:
        out = model.generate(
            **case_inputs(cases[name]), max_new_tokens=6, pad_token_id=PAD_ID, do_sample=False
        )
        expected[name] = out[0, cases[name]["input_ids"].shape[0] :].tolist()

    async def main() -> list[list[int]]:
        engine = Engine(model, tokenizer, EngineConfig(max_kv_tokens=2048, block_size=4))
        params = SamplingParams(max_tokens=6, temperature=0.0)
        streams = [engine.add_request(load_prompt(FIXTURE_DIR, name)[0], params, name) for name in CASES]
        streams.append(engine.add_request(load_prompt(FIXTURE_DIR, "chat_image")[0], params, "again"))

        async def ids(stream) -> list[int]:
            return [t async for out in stream for t in out.new_token_ids]

        results = await asyncio.gather(*(ids(s) for s in streams))
        stats = engine.image_cache
        await engine.shutdown()
        return results, stats

    results, image_cache = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert dict(zip(CASES, results[:-1], strict=True)) == expected
    assert results[-1] == expected["chat_image"]
