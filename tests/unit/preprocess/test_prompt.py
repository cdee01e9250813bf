"""Fixture parity of the prompt builder and the template rules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cogvlm_ray.config import ModelConfig, VisionConfig
from cogvlm_ray.errors import InvalidRequestError
from cogvlm_ray.hf.prompt import build_conversation_input_ids
from cogvlm_ray.preprocess.prompt import build_prompt_ids, history_to_prompt
from tests.unit.preprocess.conftest import FIXTURE_IMAGES

CASE_NAMES = ["chat_image", "base_image", "vqa_image", "chat_history_image", "text_only_chat"]


def _cases(fixture_dir: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads((fixture_dir / "cases.json").read_text())["cases"]}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_official_builder_reproduces_fixture_case(name, fixture_dir, tokenizer, model_config):
    case = _cases(fixture_dir)[name]
    golden = load_file(str(fixture_dir / "cases" / f"{name}.safetensors"))
    images = None
    if case["image"]:
        images = [Image.open(fixture_dir / FIXTURE_IMAGES[case["image"]]).convert("RGB")]
    out = build_conversation_input_ids(
        tokenizer,
        query=case["query"],
        history=[tuple(turn) for turn in case["history"]],
        images=images,
        template_version=case["template"],
        config=model_config,
    )
    assert history_to_prompt(case["template"], case["history"], case["query"]) == case["prompt_text"]
    assert out["input_ids"].tolist() == case["input_ids"] == golden["input_ids"].tolist()
    assert out["token_type_ids"].tolist() == case["token_type_ids"] == golden["token_type_ids"].tolist()
    assert torch.equal(out["attention_mask"], golden["attention_mask"])
    assert out["input_ids"].dtype == torch.long and out["labels"] is None
    if images is None:
        assert out["images"] is None
    else:
        assert len(out["images"]) == 1
        assert out["images"][0].dtype == torch.float32
        if name != "chat_image":  # PNG sources: bit-exact (JPEG decoders may differ by +-1)
            assert torch.equal(out["images"][0], golden["pixel_values"])
        else:
            torch.testing.assert_close(out["images"][0], golden["pixel_values"], atol=0.02, rtol=0)


def test_builder_does_not_mutate_tokenizer_in_core_path(tokenizer, model_config):
    before = tokenizer.pad_token_id
    ids, types = build_prompt_ids(tokenizer, model_config, query="hi", has_image=True)
    assert tokenizer.pad_token_id == before
    assert ids[1 : 1 + model_config.num_image_tokens] == [model_config.image_token_id] * 6
    assert types == [0] + [1] * 6 + [0] * (len(ids) - 7)


def test_official_builder_sets_pad_token_like_the_official_code(tokenizer, model_config):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    assert tok.pad_token_id is None
    build_conversation_input_ids(tok, query="x", images=[Image.new("RGB", (5, 5))], config=model_config)
    assert tok.pad_token_id == model_config.pad_token_id == 514


def test_placeholder_and_image_tokens_come_from_config(tokenizer, model_config):
    # 112 px / patch 14 = grid 8 -> (8/2)^2 + 2 = 18 image positions; placeholder = pad_token_id.
    vision = dataclasses.replace(model_config.vision_config, image_size=112, num_positions=65)
    config = dataclasses.replace(model_config, vision_config=vision, pad_token_id=600)
    ids, types = build_prompt_ids(tokenizer, config, query="hi", has_image=True)
    assert ids[1:19] == [600] * 18 and ids[19] != 600
    assert sum(types) == 18
    real = ModelConfig(vision_config=VisionConfig())
    assert real.num_image_tokens == 2306 and real.image_token_id == 128002


def test_templates_render_exactly():
    history = [("q1", "r1")]
    assert history_to_prompt("base", history, "A photo of") == "A photo of"
    assert history_to_prompt("chat", history, "q2") == "Question: q1 Answer: r1\nQuestion: q2 Answer:"
    assert (
        history_to_prompt("vqa", history, "q2") == "Question: q1 Short answer: r1\nQuestion: q2 Short answer:"
    )


def test_default_template_comes_from_config(tokenizer, model_config):
    vqa_config = dataclasses.replace(model_config, template_version="vqa")
    chat_ids, _ = build_prompt_ids(tokenizer, model_config, query="q")
    vqa_ids, _ = build_prompt_ids(tokenizer, vqa_config, query="q")
    assert chat_ids == build_prompt_ids(tokenizer, model_config, query="q", template_version="chat")[0]
    assert vqa_ids == build_prompt_ids(tokenizer, model_config, query="q", template_version="vqa")[0]
    assert chat_ids != vqa_ids


def test_unknown_template_is_400(tokenizer, model_config):
    with pytest.raises(InvalidRequestError, match="template_version 'llama3'"):
        build_prompt_ids(tokenizer, model_config, query="q", template_version="llama3")


def test_two_images_rejected_by_official_builder(tokenizer, model_config):
    with pytest.raises(InvalidRequestError, match="at most one image"):
        build_conversation_input_ids(
            tokenizer, query="q", images=[Image.new("RGB", (4, 4))] * 2, config=model_config
        )


def test_answer_labels(tokenizer, model_config):
    out = build_conversation_input_ids(tokenizer, query="q", answer="ok", config=model_config)
    answer_ids = tokenizer.encode("ok", add_special_tokens=False) + [tokenizer.eos_token_id]
    num_prompt = len(out["input_ids"]) - len(answer_ids)
    assert out["input_ids"][num_prompt:].tolist() == answer_ids
    assert out["labels"].tolist() == [-100] * num_prompt + answer_ids
