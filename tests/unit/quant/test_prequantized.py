"""The official int4 layout: a bnb-4bit checkpoint written the way transformers saves one, loaded back.

Measured on this fixture (bench/quant_quality.py, docs/BENCHMARKS.md): against the official float32
logits the int4 checkpoint gets top-1 agreement 0.537 and mean KL 1.18 nats over 149 positions.
The bounds below (top-1 >= 0.45, KL <= 1.5) leave a margin for CPU-kernel differences; the tiny
random model has small logit margins, so these do not describe the real model's quality.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

# The `quant` extra: without it this module is skipped, and the rest of the suite still collects.
bnb = pytest.importorskip("bitsandbytes")

from cogvlm_ray.hf import CogVLM2HFForCausalLM  # noqa: E402
from cogvlm_ray.model import CheckpointError  # noqa: E402
from cogvlm_ray.model.quantized_checkpoint import write_bnb_4bit_checkpoint  # noqa: E402

from .conftest import (  # noqa: E402
    FIXTURE_DIR,
    OFFICIAL_INT4_CONFIG,
    PAD_ID,
    agreement,
    all_logits,
    case_inputs,
    golden_logits,
    official_int4_spec,
)

INT4_MIN_TOP1 = 0.45
INT4_MAX_KL = 1.5


def float_linear_names() -> list[str]:
    model = CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.float32)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_written_layout_is_transformers_bnb_4bit(int4_checkpoint) -> None:
    state = load_file(str(int4_checkpoint / "model.safetensors"))
    config = json.loads((int4_checkpoint / "config.json").read_text())
    assert {k: config["quantization_config"][k] for k in OFFICIAL_INT4_CONFIG} == OFFICIAL_INT4_CONFIG
    linears = float_linear_names()
    assert "lm_head" in linears and any(n.startswith("model.vision.") for n in linears)
    for name in linears:
        if name == "lm_head":
            assert state["lm_head.weight"].dtype == torch.float16
            assert "lm_head.weight.absmax" not in state
            continue
        assert state[f"{name}.weight"].dtype == torch.uint8 and state[f"{name}.weight"].shape[1] == 1
        assert state[f"{name}.weight.absmax"].dtype == torch.float32
        assert state[f"{name}.weight.quant_map"].shape == (16,)
        assert f"{name}.weight.quant_state.bitsandbytes__fp4" in state
    floats = {
        k: v
        for k, v in state.items()
        if ".weight" not in k or k.endswith(("norm.weight", "embed_tokens.weight"))
    }
    assert floats and all(v.dtype == torch.float16 for v in floats.values())  # biases, norms, embeddings


def test_int4_checkpoint_loads_into_bnb_layers_and_matches_float_within_bound(int4_checkpoint, cases) -> None:
    model = CogVLM2HFForCausalLM.from_pretrained(int4_checkpoint, dtype=torch.float32)
    assert model.quantization_spec.prequantized
    gate = model.model.layers[0].mlp.language_mlp.gate_proj
    assert isinstance(gate, bnb.nn.Linear4bit) and gate.weight.quant_state.quant_type == "fp4"
    assert isinstance(model.model.vision.transformer.layers[0].mlp.fc1, bnb.nn.Linear4bit)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.kv_cache_layout()[0][1] == torch.float32
    top1, kl = agreement(golden_logits(cases), all_logits(model, cases))
    assert top1 >= INT4_MIN_TOP1 and kl <= INT4_MAX_KL, (top1, kl)


def test_int4_checkpoint_generates(int4_checkpoint, cases) -> None:
    model = CogVLM2HFForCausalLM.from_pretrained(int4_checkpoint, dtype=torch.bfloat16)
    case = cases["chat_image"]
    out = model.generate(**case_inputs(case), max_new_tokens=6, pad_token_id=PAD_ID, do_sample=False)
    new = out[0, case["input_ids"].shape[0] :]
    assert new.shape == (6,) and bool(((new >= 0) & (new < 768)).all())


def test_roundtrip_is_exact(tmp_path, cases) -> None:
    """Saved then loaded gives the very layers that were saved: same codes, same scales, same logits."""
    spec = official_int4_spec()
    written = write_bnb_4bit_checkpoint(FIXTURE_DIR, tmp_path / "fp32", spec, float_dtype=torch.float32)
    in_memory = CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.float32, quantization=spec)
    reloaded = CogVLM2HFForCausalLM.from_pretrained(written, dtype=torch.float32)
    some = {k: cases[k] for k in ("chat_image", "text_only_chat")}
    torch.testing.assert_close(all_logits(reloaded, some), all_logits(in_memory, some), rtol=0, atol=1e-5)


def test_sharded_int4_checkpoint_with_parts_split_across_files(int4_checkpoint, tmp_path, cases) -> None:
    """A layer's packed weight and its quant state may sit in different shards (index order)."""
    sharded = tmp_path / "sharded"
    shutil.copytree(int4_checkpoint, sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for i, key in enumerate(sorted(state)):  # neighbours (X.weight, X.weight.absmax, ...) alternate
        shards[i % 2][key] = state[key]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(sharded / name), metadata={"format": "pt"})
    weight_map = {key: names[i] for i, shard in enumerate(shards) for key in shard}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    some = {"chat_image": cases["chat_image"]}
    torch.testing.assert_close(
        all_logits(CogVLM2HFForCausalLM.from_pretrained(sharded, dtype=torch.float32), some),
        all_logits(CogVLM2HFForCausalLM.from_pretrained(int4_checkpoint, dtype=torch.float32), some),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("model.layers.1.mlp.vision_mlp.up_proj.weight.absmax"), "lacks weight.absmax"),
        (lambda s: s.pop("model.layers.0.self_attn.language_expert_dense.weight"), "lacks weight"),
        (
            lambda s: s.__setitem__(
                "model.layers.0.mlp.language_mlp.up_proj.weight", torch.zeros(10, 1, dtype=torch.uint8)
            ),
            "packed 4-bit 'model.layers.0.mlp.language_mlp.up_proj.weight' has shape",
        ),
        (
            lambda s: s.__setitem__("model.layers.0.mlp.language_mlp.up_proj.weight.extra", torch.zeros(1)),
            "unexpected quantization tensor",
        ),
        (
            lambda s: s.__setitem__("lm_head.weight.absmax", torch.zeros(1)),
            "unexpected key 'lm_head.weight.absmax'",
        ),
    ],
)
def test_damaged_int4_checkpoint_names_the_key(int4_checkpoint, tmp_path, damage, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(int4_checkpoint, broken)
    state = load_file(str(broken / "model.safetensors"))
    damage(state)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        CogVLM2HFForCausalLM.from_pretrained(broken, dtype=torch.float32)
