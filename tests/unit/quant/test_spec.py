"""Quantization settings: parsing, the official int4 config, and the errors for impossible requests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cogvlm_ray.model.quantization import (
    QUANTIZATION_METHODS,
    QuantizationSpec,
    WeightQuantizer,
    resolve_quantization,
)

from .conftest import OFFICIAL_INT4_CONFIG


@pytest.mark.parametrize("requested", [None, "none", "auto", "bnb-4bit"])
def test_official_int4_config_reads_as_prequantized_fp4_with_float32_compute(requested) -> None:
    spec = resolve_quantization(requested, OFFICIAL_INT4_CONFIG)
    assert spec is not None and spec.prequantized
    assert (spec.method, spec.bnb_4bit_quant_type, spec.bnb_4bit_compute_dtype) == (
        "bnb-4bit",
        "fp4",
        "float32",
    )
    assert (spec.bnb_4bit_quant_storage, spec.bnb_4bit_use_double_quant) == ("uint8", False)
    # lm_head stays float (transformers' get_keys_to_not_convert); everything else is a target.
    assert spec.is_skipped("lm_head") and not spec.is_skipped("model.vision.transformer.layers.0.mlp.fc1")
    written = spec.to_hf_config()
    assert {k: written[k] for k in OFFICIAL_INT4_CONFIG} == OFFICIAL_INT4_CONFIG


@pytest.mark.parametrize("requested", [None, "none", "auto"])
def test_float_checkpoint_without_request_is_not_quantized(requested) -> None:
    assert resolve_quantization(requested, None) is None


@pytest.mark.parametrize("method", [m for m in QUANTIZATION_METHODS if m != "none"])
def test_every_method_parses_and_vision_switch_adds_the_prefix(method: str) -> None:
    spec = resolve_quantization(method.upper(), None, quantize_vision=False)
    assert spec is not None and spec.method == method and not spec.prequantized
    assert spec.is_skipped("model.vision.linear_proj.gate_proj")
    assert not spec.is_skipped("model.layers.0.mlp.language_mlp.gate_proj")
    assert not spec.is_skipped("model.visionary")  # prefix match is by module, not by string


@pytest.mark.parametrize(
    ("requested", "config", "message"),
    [
        ("int3", None, "unknown quantization"),
        (QuantizationSpec("bnb-4bit", bnb_4bit_quant_type="nf3"), None, "fp4 or nf4"),
        ("bnb-8bit", OFFICIAL_INT4_CONFIG, "already quantized"),
        ("int8-wo", OFFICIAL_INT4_CONFIG, "already quantized"),
        (None, {**OFFICIAL_INT4_CONFIG, "load_in_4bit": False, "load_in_8bit": True}, "8-bit checkpoints"),
        (None, {"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
        (None, {**OFFICIAL_INT4_CONFIG, "bnb_4bit_compute_dtype": "float77"}, "unknown dtype"),
    ],
)
def test_impossible_requests_raise_value_error(requested, config, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_quantization(requested, config)


def test_vision_switch_cannot_dequantize_a_prequantized_vision_tower() -> None:
    with pytest.raises(ValueError, match="quantize_vision=False"):
        resolve_quantization(None, OFFICIAL_INT4_CONFIG, quantize_vision=False)
    kept = {**OFFICIAL_INT4_CONFIG, "llm_int8_skip_modules": ["model.vision"]}
    assert resolve_quantization(None, kept, quantize_vision=False).is_skipped("model.vision.conv")


def test_fp8_refuses_a_cpu_device_map() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="compute capability"):
        WeightQuantizer(QuantizationSpec("fp8"), torch.bfloat16).prepare(model, ["cpu"])


def test_quantizer_claims_only_target_weights() -> None:
    model = nn.Module()
    model.proj = nn.Linear(64, 64)
    model.lm_head = nn.Linear(64, 8)
    model.norm = nn.LayerNorm(64)
    on_the_fly = WeightQuantizer(QuantizationSpec("bnb-4bit"), torch.float32)
    on_the_fly.prepare(model, ["cpu"])
    assert on_the_fly.claims("proj.weight", torch.float32)
    assert not on_the_fly.claims("proj.bias", torch.float32)
    assert not on_the_fly.claims("lm_head.weight", torch.float32)
    assert not on_the_fly.claims("norm.weight", torch.float32)
    assert not on_the_fly.claims("proj.weight.absmax", torch.float32)  # left to the strict loader
    stored = WeightQuantizer(QuantizationSpec.from_hf_config(OFFICIAL_INT4_CONFIG), torch.float32)
    stored.prepare(model, ["cpu"])
    assert stored.claims("proj.weight", torch.uint8) and stored.claims("proj.weight.absmax", torch.float32)
    assert not stored.claims("proj.weight", torch.float16)  # a layer the checkpoint kept in float
    assert stored.check("proj.weight", (2048, 1)) is None  # 64 * 64 nibbles in uint8
    assert "expected (2048, 1)" in stored.check("proj.weight", (4096, 1))
    assert "unexpected" in stored.check("proj.weight.quant_state.bitsandbytes__nf4", (60,))
