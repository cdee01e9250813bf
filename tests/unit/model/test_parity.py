"""float32 parity with the official CogVLM2 outputs on the tiny fixture (README tolerance)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cogvlm_ray.hf import CogVLM2HFForCausalLM
from cogvlm_ray.model import CogVLM2ForCausalLM

from .conftest import (
    CASES,
    FIXTURE_DIR,
    PagedRunner,
    assert_close_golden,
    greedy_decode,
    load_case,
    prompt_inputs,
)

IMAGE_CASES = [c for c in CASES if c != "text_only_chat"]


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_vision_intermediates(tiny_model: CogVLM2ForCausalLM, name: str) -> None:
    case = load_case(name)
    vision = tiny_model.model.vision
    with torch.no_grad():
        patches = vision.embed_patches(case["pixel_values"][None])
        transformed = vision.transformer(patches)
        conv = vision.downsample(transformed)
        glu = vision.adapt(conv)
    assert_close_golden(patches[0], case["vision_patch_embed"], "patch embed")
    assert_close_golden(transformed[0], case["vision_transformer_out"], "transformer out")
    assert_close_golden(conv[0], case["vision_conv_out"], "conv out")
    assert_close_golden(glu[0], case["vision_glu_out"], "glu out")
    assert_close_golden(
        tiny_model.encode_images(case["pixel_values"][None])[0], case["vision_features"], "features"
    )


@pytest.mark.parametrize("name", CASES)
def test_prefill_logits_and_hidden_states(tiny_model: CogVLM2ForCausalLM, name: str) -> None:
    case = load_case(name)
    layer_inputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args: layer_inputs.append(args[0].clone()))
        for layer in tiny_model.model.layers
    ]
    try:
        hidden = PagedRunner(tiny_model).step([("s", prompt_inputs(tiny_model, case))])[0]
    finally:
        for hook in hooks:
            hook.remove()
    golden = case["hidden_states"]  # input to layer 0, input to layer 1, final (after norm)
    assert_close_golden(layer_inputs[0], golden[0], "layer 0 input")
    assert_close_golden(layer_inputs[1], golden[1], "layer 1 input")
    assert_close_golden(hidden, golden[2], "final hidden")
    logits = tiny_model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    assert_close_golden(logits, case["logits"], "logits")


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_through_paged_decode(tiny_model: CogVLM2ForCausalLM, name: str) -> None:
    case = load_case(name)
    ids, scores = greedy_decode(tiny_model, case, 12)
    assert ids == case["generated_ids"].tolist()
    assert_close_golden(scores[0], case["first_step_scores"], "first step")
    assert_close_golden(scores[-1], case["last_step_scores"], "last step (cached decode)")


def test_hf_forward_batch_logits_on_real_positions(tiny_hf_model: CogVLM2HFForCausalLM) -> None:
    batch = load_file(str(FIXTURE_DIR / "batch.safetensors"))
    out = tiny_hf_model(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
        images=[[img] for img in batch["pixel_values"]],
    )
    assert out.logits.shape == batch["logits"].shape and out.logits.dtype == torch.float32
    real = batch["attention_mask"].bool()
    assert_close_golden(out.logits[real], batch["logits"][real], "batch logits")


@pytest.mark.parametrize("name", CASES)
def test_hf_forward_matches_official_logits(tiny_hf_model: CogVLM2HFForCausalLM, name: str) -> None:
    case = load_case(name)
    images = [[case["pixel_values"]]] if "pixel_values" in case else None
    out = tiny_hf_model(
        input_ids=case["input_ids"][None],
        token_type_ids=case["token_type_ids"][None],
        attention_mask=case["attention_mask"][None],
        images=images,
    )
    assert_close_golden(out.logits[0], case["logits"], "logits")
