"""Token text and bytes for logprobs: what OpenAI's `token` and `bytes` fields carry.

`token` is the token decoded on its own, special tokens by name (`<|eot_id|>`); a token that
ends inside a multi-byte character decodes to U+FFFD there, so `bytes` are taken from the
vocabulary itself: for byte-level BPE (Llama-3, the CogVLM2 tokenizer) each character of the
vocabulary string stands for one byte (GPT-2's byte-to-unicode table), which gives the
token's exact bytes. Other tokenizers fall back to the UTF-8 of `token`. Results are cached per
id (the output processor asks for up to 21 ids per generated token).
"""

from __future__ import annotations

import functools
from typing import Any

from cogvlm_ray.contracts import TokenLogprob


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to 256+."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenText:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._is_byte_level = "ByteLevel" in repr(decoder)
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))

    def lookup(self, token_id: int) -> tuple[str, bytes]:
        """(text, bytes) of one token."""
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            hit = self._cache[token_id] = (text, self._bytes(token_id, text))
        return hit

    def _bytes(self, token_id: int, text: str) -> bytes:
        if self._is_byte_level and token_id not in self._special_ids:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            table = _unicode_to_byte()
            if isinstance(piece, str) and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return text.encode("utf-8", errors="replace")

    def fill(self, logprob: TokenLogprob) -> TokenLogprob:
        """The same entry (and its top list) with token text and bytes filled in."""
        text, raw = self.lookup(logprob.token_id)
        top = tuple(self.fill(t) for t in logprob.top_logprobs)
        return TokenLogprob(logprob.token_id, logprob.logprob, text, raw, top)
