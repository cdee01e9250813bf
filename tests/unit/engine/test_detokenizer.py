"""Incremental detokenization: UTF-8 safe streaming, stop strings held back across tokens."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = (), min_check: int = 0):
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for i, token_id in enumerate(ids):
        delta = detok.add_tokens([token_id], check_stop=i + 1 >= min_check)
        deltas.append(delta.text)
        if delta.stopped:
            return deltas, True
    deltas.append(detok.finish())
    return deltas, False


def test_multibyte_characters_never_stream_broken(tokenizer):
    text = "猫 café 🐱🚀 naïve — 你好，世界"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) / 2, "the fixture tokenizer splits these into byte tokens"
    deltas, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert sum(1 for d in deltas if d == "") > 0, "some tokens end inside a character and emit nothing"


def test_joined_deltas_equal_one_shot_decode_with_special_tokens(tokenizer):
    ids = (
        tokenizer.encode("The cat sat. ", add_special_tokens=True)
        + [514, 521]
        + tokenizer.encode("Zürich 5 °C", add_special_tokens=False)
    )
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_trailing_incomplete_character_is_flushed_like_decode(tokenizer):
    ids = tokenizer.encode("ok 🐱", add_special_tokens=False)[:-1]  # cut inside the emoji
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", ["square is", "e is r", "d.", "red"])
def test_stop_string_across_tokens_never_leaks(tokenizer, stop):
    text = "The square is red. The cat is in the corner."
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, stopped = stream(tokenizer, ids, stop=(stop, "never-there"))
    assert stopped
    joined = "".join(deltas)
    assert joined == text[: text.index(stop)]
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_held_back_prefix_is_released_when_no_stop_follows(tokenizer):
    text = "The square is red"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, stopped = stream(tokenizer, ids, stop=("red square",))
    assert not stopped and "".join(deltas) == text
    assert not deltas[-2].endswith("red"), "'red' could start the stop string, so it was held back"


def test_stop_strings_ignored_before_min_tokens(tokenizer):
    text = "red red red"
    ids = tokenizer.encode(text, add_special_tokens=False)
    first_red_end = next(i for i in range(len(ids)) if "red" in tokenizer.decode(ids[: i + 1]))
    deltas, stopped = stream(tokenizer, ids, stop=("red",), min_check=first_red_end + 2)
    assert stopped and "".join(deltas).startswith("red")
