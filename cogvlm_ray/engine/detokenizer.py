"""Incremental, UTF-8 safe detokenization with stop strings held back.

Text for new tokens is the difference between decoding a short window of recent ids with and
without them (the prefix/read offsets of TGI and vLLM). If the window still ends in U+FFFD the
new token ended inside a multi-byte character, so nothing is emitted until a later token
completes it; the Chinese checkpoint never streams a broken character. For byte-level BPE this
is exact: the joined deltas equal `tokenizer.decode(all_ids, skip_special_tokens=True)`.

Stop strings: text that could be the start of a stop string is held back; when a stop string
appears the text is cut at its start and the request finishes with "stop". Stop strings are
only looked for once `min_tokens` tokens have been generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizerDelta:
    text: str
    """New text safe to emit."""
    stopped: bool
    """A stop string was found; the request must finish with reason "stop"."""


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.output_text = ""
        """All text decoded so far (after a stop, cut at the stop string)."""
        self._num_emitted = 0
        self._stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> None:
        """Move complete new text from the id window into output_text."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) > len(prefix_text) and (final or not window_text.endswith(REPLACEMENT_CHAR)):
            self.output_text += window_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def add_tokens(self, token_ids: list[int], *, check_stop: bool = True) -> DetokenizerDelta:
        """Feed new ids; returns the text that may be streamed now."""
        for token_id in token_ids:
            self._ids.append(token_id)
            self._decode_new(final=False)
        if check_stop and self._stop:
            cut = self._find_stop()
            if cut is not None:
                self.output_text = self.output_text[:cut]
                self._stopped = True
                return DetokenizerDelta(self._emit(len(self.output_text)), stopped=True)
            return DetokenizerDelta(self._emit(len(self.output_text) - self._held_back()), stopped=False)
        return DetokenizerDelta(self._emit(len(self.output_text)), stopped=False)

    def finish(self) -> str:
        """Flush everything held back (including a trailing incomplete character, as decode() does)."""
        if self._stopped:
            return ""
        if self._read_offset < len(self._ids):
            self._decode_new(final=True)
        return self._emit(len(self.output_text))

    def _emit(self, end: int) -> str:
        end = max(end, self._num_emitted)
        text = self.output_text[self._num_emitted : end]
        self._num_emitted = end
        return text

    def _find_stop(self) -> int | None:
        """Earliest start of a stop string in the not-yet-emitted text."""
        hits = [i for s in self._stop if (i := self.output_text.find(s, self._num_emitted)) != -1]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of some stop string."""
        pending = len(self.output_text) - self._num_emitted
        for k in range(min(self._max_hold, pending), 0, -1):
            suffix = self.output_text[-k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0
