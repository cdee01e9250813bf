"""The tiny tokenizer: a byte-level BPE + the 256 Llama-3 special tokens, in the official format.

`write_tokenizer(dir, vocab_size)` writes `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json` like the Llama-3 tokenizer CogVLM2 ships (and like the shared fixture):
`vocab_size - 256` regular tokens trained on the English text embedded here, then the 256 Llama-3
special tokens in Llama-3 order, bos prepended by the post-processor. Load it with
`PreTrainedTokenizerFast.from_pretrained(dir)`. Deterministic; needs no network.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import pre_tokenizers

NUM_SPECIAL_TOKENS = 256
"""Llama-3 reserves the last 256 ids for special tokens (128000..128255 in the real vocab)."""

# Training text for the tiny tokenizer. Written for this project; the CJK and emoji lines make
# multi-byte UTF-8 tokens so streaming detokenisation can be tested.
TRAINING_TEXT = """\
A picture can hold a whole story. In this one, a small red square sits on a wide green field,
and a grey cat watches it from the corner. The light is soft, the colours are simple, and there
is no text anywhere in the image. What is in this picture? Describe the image. How many red
squares are there? There is one red square, and it is near the centre of the frame.

The model reads the question, looks at the image, and writes an answer one token at a time.
Each new word depends on the words before it. When the answer is complete, the model stops and
the server sends the last chunk to the user. Short answers are fast; long answers take longer,
but the first words arrive quickly when the server streams them.

Tell me a short story about a cat. Once upon a time, a curious cat named Pepper lived in a
quiet house by the river. Every morning she sat at the window and counted the boats. One day a
blue boat stopped at the garden gate, and a friendly dog jumped out to say hello. They became
good friends, and they walked along the water until the sun went down.

Questions and answers: What colour is the square? The square is red. Is there any text? No.
Where is the cat? The cat is in the corner of the picture, next to an old wooden chair. Numbers
also appear in text: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2024, 3.14, and 1,344 pixels.

你好，世界。这是一只猫在桌子上睡觉。图片里有一个红色的正方形。
こんにちは、世界。猫が窓のそばに座っています。
안녕하세요. 고양이가 자고 있어요.
Emoji and symbols: 🐱 🐶 🚀 😀 👍 ❤️ ☀️ 🌧️ — “quotes”, café, naïve, Zürich, 5 °C, 10 € and 20 £.
"""


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special token names in id order (128000..128255 in the real vocab)."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_TOKENS - 5)]
    return [
        "<|begin_of_text|>", "<|end_of_text|>", *reserved[:4], "<|start_header_id|>",
        "<|end_header_id|>", reserved[4], "<|eot_id|>", *reserved[5:],
    ]  # fmt: skip


def _byte_level_words(text: str) -> Counter[str]:
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return Counter(word for word, _ in splitter.pre_tokenize_str(text))


def train_bpe(text: str, num_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train a byte-level BPE with exactly `num_tokens` tokens (256 byte symbols + merges).

    Plain and deterministic: the most frequent adjacent pair wins, ties go to the smallest pair.
    When the text runs out of pairs, further merges join existing tokens with single bytes, so
    any vocabulary size can be reached (those tokens are valid but rarely produced).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if num_tokens < len(alphabet):
        raise ValueError(f"a byte-level BPE needs at least {len(alphabet)} tokens")
    vocab = list(alphabet)
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    words = {tuple(w): c for w, c in _byte_level_words(text).items()}
    while len(vocab) < num_tokens:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        if joined not in known:
            vocab.append(joined)
            known.add(joined)
        words = {_merge(symbols, best, joined): count for symbols, count in words.items()}
    for left, right in _filler_pairs(vocab, alphabet):
        if len(vocab) >= num_tokens:
            break
        if left + right not in known:
            merges.append((left, right))
            vocab.append(left + right)
            known.add(left + right)
    return vocab, merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str], joined: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(joined)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _filler_pairs(vocab: list[str], alphabet: list[str]) -> Iterator[tuple[str, str]]:
    for i in range(len(alphabet), 10**9):  # vocab grows while we iterate; the caller stops us
        if i >= len(vocab):
            return
        for byte in alphabet:
            yield vocab[i], byte


def write_tokenizer(out_dir: str | Path, vocab_size: int, text: str = TRAINING_TEXT) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` (fixture format)."""
    out = Path(out_dir)
    base = vocab_size - NUM_SPECIAL_TOKENS
    vocab, merges = train_bpe(text, base)
    specials = llama3_special_tokens()
    bos, eos = specials[0], specials[1]
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    added = [{"id": base + i, "content": tok, **flags} for i, tok in enumerate(specials)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {  # Llama-3: bos before every sequence when add_special_tokens=True
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [base], "tokens": [bos]}},
        },
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(vocab)},
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }  # fmt: skip
    _write_json(out / "tokenizer.json", tokenizer)
    tokenizer_config = {
        "added_tokens_decoder": {str(t["id"]): {"content": t["content"], **flags} for t in added},
        "bos_token": bos,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
