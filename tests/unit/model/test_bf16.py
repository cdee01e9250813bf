"""bfloat16: the official rotary numerics by default (README `bf16/` recipe), exact positions on request."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cogvlm_ray.hf import CogVLM2HFForCausalLM
from cogvlm_ray.model import CogVLM2ForCausalLM
from cogvlm_ray.model.layout import build_position_ids, build_vision_expert_mask

from .conftest import FIXTURE_DIR, PagedRunner

BF16_DIR = FIXTURE_DIR / "bf16"
QUIRK_BOUND = 0.7


def _case(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(BF16_DIR / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def bf16_models() -> dict[str, CogVLM2ForCausalLM]:
    return {
        "official": CogVLM2HFForCausalLM.from_pretrained(FIXTURE_DIR, dtype=torch.bfloat16),
        "exact": CogVLM2HFForCausalLM.from_pretrained(
            FIXTURE_DIR, dtype="bfloat16", exact_rotary_positions=True
        ),
    }


def teacher_forced_distance(model: CogVLM2ForCausalLM, case: dict[str, torch.Tensor]) -> float:
    """D of the README: max |ours - golden| over the last 32 prompt rows and the 16 generation steps."""
    generated = case["generated_ids"]
    length = case["input_ids"].shape[0]
    ids = torch.cat([case["input_ids"], generated[:-1]])
    types = torch.cat([case["token_type_ids"], torch.zeros(len(generated) - 1, dtype=torch.long)])
    inputs = {
        "input_ids": ids,
        "positions": build_position_ids(types),
        "vision_mask": build_vision_expert_mask(types),
    }
    assert torch.equal(inputs["positions"][:length], case["position_ids"])
    if "pixel_values" in case:
        inputs["image_embeds"] = model.encode_images(case["pixel_values"][None])[0]
        inputs["image_token_mask"] = types == 1
    logits = model.compute_logits(PagedRunner(model, block_size=16, num_blocks=64).step([("s", inputs)])[0])
    tail = (logits[length - 32 : length] - case["logits_tail"]).abs().max()
    steps = (logits[length - 1 :] - case["generation_scores"]).abs().max()
    return max(tail.item(), steps.item())


@pytest.mark.parametrize("name", ["long_text_chat", "long_image_chat"])
def test_rotary_table_is_bit_exact(bf16_models: dict[str, CogVLM2ForCausalLM], name: str) -> None:
    case = _case(name)
    rotary = bf16_models["official"].model.layers[0].self_attn.rotary_emb
    assert rotary.inv_freq.dtype == torch.bfloat16
    positions = torch.arange(case["rotary_cos"].shape[0])
    cos, sin = rotary.cos_sin(positions, torch.bfloat16)
    assert torch.equal(cos.float(), case["rotary_cos"])
    assert torch.equal(sin.float(), case["rotary_sin"])
    exact_cos, _ = (
        bf16_models["exact"].model.layers[0].self_attn.rotary_emb.cos_sin(positions, torch.bfloat16)
    )
    assert not torch.equal(exact_cos.float(), case["rotary_cos"])


@pytest.mark.parametrize("name", ["long_text_chat", "long_image_chat"])
def test_official_numerics_reproduce_bf16_logits(
    bf16_models: dict[str, CogVLM2ForCausalLM], name: str
) -> None:
    assert teacher_forced_distance(bf16_models["official"], _case(name)) <= QUIRK_BOUND


def test_exact_positions_do_not_reproduce_the_quirk(bf16_models: dict[str, CogVLM2ForCausalLM]) -> None:
    assert teacher_forced_distance(bf16_models["exact"], _case("long_text_chat")) > QUIRK_BOUND


def test_bf16_greedy_tokens_match(bf16_models: dict[str, CogVLM2ForCausalLM]) -> None:
    case = _case("long_text_chat")
    out = bf16_models["official"].generate(
        input_ids=case["input_ids"][None],
        token_type_ids=case["token_type_ids"][None],
        attention_mask=case["attention_mask"][None],
        max_new_tokens=16,
        pad_token_id=514,
        do_sample=False,
    )
    assert out[0, -16:].tolist() == case["generated_ids"].tolist()
