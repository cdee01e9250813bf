"""Preprocessor.prepare end to end: fixture ids from OpenAI messages, one-image rule, context window."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from cogvlm_ray.errors import ImageError, InvalidRequestError, PromptTooLongError
from cogvlm_ray.model.pixels import normalize_image
from cogvlm_ray.preprocess import PreparedPrompt, Preprocessor
from cogvlm_ray.preprocess.messages import TEXT_ONLY_PREAMBLE
from tests.unit.preprocess.conftest import (
    FIXTURE_IMAGES,
    data_url,
    encode_image,
    noise_image,
    user_image_message,
)


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return {c["name"]: c for c in json.loads((fixture_dir / "cases.json").read_text())["cases"]}


def _image_url(fixture_dir, name):
    return data_url((fixture_dir / FIXTURE_IMAGES[name]).read_bytes(), "image/jpeg")


@pytest.mark.parametrize("name", ["chat_image", "base_image", "vqa_image", "chat_history_image"])
def test_openai_messages_reproduce_fixture_ids(name, cases, fixture_dir, make_preprocessor):
    case = cases[name]
    url = _image_url(fixture_dir, case["image"])
    messages = []
    for index, (query, response) in enumerate(case["history"]):
        # The client resends the same image on the first turn: same bytes, so allowed.
        messages.append(user_image_message(url, query) if index == 0 else {"role": "user", "content": query})
        messages.append({"role": "assistant", "content": response})
    messages.append(user_image_message(url, case["query"]))
    prepared = make_preprocessor().prepare(messages, max_tokens=16, template_version=case["template"])
    assert isinstance(prepared, PreparedPrompt)
    assert prepared.input_ids == case["input_ids"]
    assert prepared.token_type_ids == case["token_type_ids"]
    assert prepared.num_prompt_tokens == case["seq_len"]
    assert prepared.image.dtype == np.uint8 and prepared.image.shape == (3, 56, 56)
    assert len(prepared.image_hash) == 64
    if case["image"] != "img_rgb_odd":
        golden = load_file(str(fixture_dir / "preprocess.safetensors"))[f"{case['image']}.pixel_values"]
        assert np.array_equal(normalize_image(prepared.image).numpy(), golden)


def test_default_template_is_the_models(cases, fixture_dir, make_preprocessor):
    url = _image_url(fixture_dir, "img_rgb_odd")
    prepared = make_preprocessor().prepare(
        [user_image_message(url, cases["chat_image"]["query"])], max_tokens=1
    )
    assert prepared.input_ids == cases["chat_image"]["input_ids"]


def test_text_only_uses_preamble_inside_chat_template(make_preprocessor, tokenizer):
    prepared = make_preprocessor().prepare([{"role": "user", "content": "Hi"}], max_tokens=4)
    text = f"Question: {TEXT_ONLY_PREAMBLE} USER: Hi ASSISTANT: Answer:"
    assert prepared.input_ids == [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    assert set(prepared.token_type_ids) == {0}
    assert prepared.image is None and prepared.image_hash is None and not prepared.has_image


def test_two_different_images_are_400(make_preprocessor):
    first = data_url(encode_image(noise_image(8, 8, seed=1), "PNG"))
    second = data_url(encode_image(noise_image(8, 8, seed=2), "PNG"))
    messages = [user_image_message(first), {"role": "assistant", "content": "ok"}, user_image_message(second)]
    with pytest.raises(ImageError, match="one image per conversation; this request has 2 different images"):
        make_preprocessor().prepare(messages, max_tokens=1)


def test_image_in_earlier_turn_goes_right_after_bos(make_preprocessor, model_config):
    url = data_url(encode_image(noise_image(8, 8), "PNG"))
    messages = [
        user_image_message(url, "q1"),
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    prepared = make_preprocessor().prepare(messages, max_tokens=1)
    n = model_config.num_image_tokens
    assert prepared.token_type_ids[: n + 2] == [0] + [1] * n + [0]


def test_context_window_check_names_requested_and_allowed(make_preprocessor):
    preprocessor = make_preprocessor()
    prompt = preprocessor.prepare([{"role": "user", "content": "Hello"}], max_tokens=1)
    allowed = preprocessor.config.max_context_len
    fits = allowed - prompt.num_prompt_tokens
    assert preprocessor.prepare([{"role": "user", "content": "Hello"}], max_tokens=fits).num_prompt_tokens > 0
    with pytest.raises(PromptTooLongError) as excinfo:
        preprocessor.prepare([{"role": "user", "content": "Hello"}], max_tokens=fits + 1)
    assert f"maximum context length is {allowed} tokens" in excinfo.value.message
    assert (
        f"you requested {allowed + 1} tokens ({prompt.num_prompt_tokens} in the messages, {fits + 1} in the completion)"
        in excinfo.value.message
    )
    assert excinfo.value.status_code == 400 and excinfo.value.code == "context_length_exceeded"


@pytest.mark.parametrize("max_tokens", [0, -3, True, 2.5, None])
def test_max_tokens_must_be_positive_int(make_preprocessor, max_tokens):
    with pytest.raises(InvalidRequestError, match="max_tokens must be a positive integer"):
        make_preprocessor().prepare([{"role": "user", "content": "x"}], max_tokens=max_tokens)


def test_unknown_template_is_400(make_preprocessor):
    with pytest.raises(InvalidRequestError, match="unknown template_version 'chatml'") as excinfo:
        make_preprocessor().prepare(
            [{"role": "user", "content": "x"}], max_tokens=1, template_version="chatml"
        )
    assert excinfo.value.param == "template_version"


def test_decoded_image_cache_hits_on_same_bytes(make_preprocessor, monkeypatch):
    from cogvlm_ray.preprocess import preprocessor as module

    calls = []
    real = module.decode_image
    monkeypatch.setattr(module, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    pre = make_preprocessor(image_cache_size=2)
    url = data_url(encode_image(noise_image(8, 8), "PNG"))
    first = pre.prepare([user_image_message(url)], max_tokens=1)
    second = pre.prepare([user_image_message(url)], max_tokens=1)
    assert len(calls) == 1 and first.image_hash == second.image_hash and first.image is second.image
    assert (
        make_preprocessor(image_cache_size=0).prepare([user_image_message(url)], max_tokens=1).image_hash
        == first.image_hash
    )


def test_preprocessor_from_checkpoint_path(fixture_dir, cases):
    pre = Preprocessor(fixture_dir)
    prepared = pre.prepare([{"role": "user", "content": "x"}], max_tokens=1, template_version="base")
    assert prepared.input_ids[0] == 512 and pre.image_size == 56


def test_preprocess_package_does_not_import_ray():
    import ast
    from pathlib import Path

    import cogvlm_ray.preprocess as package

    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path.name} imports {names}"


def test_concurrent_prepare_matches_sequential(make_preprocessor):
    from concurrent.futures import ThreadPoolExecutor

    pre = make_preprocessor()
    requests = [
        [user_image_message(data_url(encode_image(noise_image(20, 10, seed=i), "PNG")), f"question {i}")]
        if i % 2
        else [{"role": "user", "content": f"question {i} " * (i + 1)}]
        for i in range(12)
    ]
    sequential = [pre.prepare(r, max_tokens=8) for r in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda r: pre.prepare(r, max_tokens=8), requests))
    for a, b in zip(sequential, concurrent, strict=True):
        assert a.input_ids == b.input_ids and a.image_hash == b.image_hash


def test_early_context_check_uses_the_engines_max_model_len(model_config, tokenizer):
    """With `engine.max_model_len` set, the preprocessor refuses exactly what the engine would."""
    preprocessor = Preprocessor(model_config, tokenizer, max_model_len=128)
    num_prompt = preprocessor.prepare([{"role": "user", "content": "Hello"}], max_tokens=1).num_prompt_tokens
    preprocessor.prepare([{"role": "user", "content": "Hello"}], max_tokens=128 - num_prompt)
    with pytest.raises(PromptTooLongError, match="maximum context length is 128 tokens"):
        preprocessor.prepare([{"role": "user", "content": "Hello"}], max_tokens=129 - num_prompt)


def test_a_parsed_conversation_is_taken_as_is(make_preprocessor):
    from cogvlm_ray.preprocess.messages import parse_messages

    messages = [{"role": "user", "content": "Hello"}]
    pre = make_preprocessor()
    assert pre.prepare(parse_messages(messages), max_tokens=4) == pre.prepare(messages, max_tokens=4)
