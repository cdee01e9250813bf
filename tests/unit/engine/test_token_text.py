"""Token text and bytes for logprobs: a token's bytes are exact even inside a multi-byte character."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import TokenLogprob
from cogvlm_ray.engine.token_text import TokenText


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


@pytest.mark.parametrize("text", ["hello world", "naïve café", "中文 emoji 🙂 ok", "tab\tnew\nline"])
def test_token_bytes_join_to_the_utf8_of_the_text(tokenizer, text):
    token_text = TokenText(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(token_text.lookup(i)[1] for i in ids) == text.encode("utf-8")
    for i in ids:
        assert token_text.lookup(i)[0] == tokenizer.decode([i], skip_special_tokens=False)


def test_special_tokens_by_name_and_fill_covers_the_top_list(tokenizer):
    token_text = TokenText(tokenizer)
    special = tokenizer.all_special_ids[0]
    name = tokenizer.convert_ids_to_tokens(special)
    assert token_text.lookup(special) == (name, name.encode())
    filled = token_text.fill(TokenLogprob(special, -0.5, top_logprobs=(TokenLogprob(special, -0.5),)))
    assert filled.token == name and filled.top_logprobs[0].token_bytes == name.encode()
