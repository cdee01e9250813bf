"""The grammar backend contract: compile a spec once, then one cheap matcher per request.

A backend turns a `StructuredOutputSpec` into an opaque compiled grammar (expensive, cached and
run off the engine loop by `manager.py`) and makes matchers from it (cheap, one per request).
A matcher follows one sequence: it accepts each sampled token, writes the tokens allowed next
into one row of a bitmask, and can roll back the last tokens it accepted.

Bitmask convention (xgrammar's): int32 [B, ceil(V / 32)], bit j of row b set = token j allowed.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from cogvlm_ray.contracts import StructuredOutputSpec


class GrammarMatcher(Protocol):
    """One request's position in its grammar."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) when the grammar forbids it."""
        ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (int32, CPU)."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing may follow."""
        ...

    def reset(self) -> None:
        """Back to the start of the grammar."""
        ...


class GrammarBackend(Protocol):
    vocab_size: int
    """Width of the logits the bitmask covers."""

    def compile(self, spec: StructuredOutputSpec) -> Any:
        """Compile a spec (thread-safe, may be slow); raises errors.GrammarError for a bad spec."""
        ...

    def grammar_num_bytes(self, compiled: Any) -> int:
        """Memory held by a compiled grammar (for the cache's accounting and the size bound)."""
        ...

    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar (cheap)."""
        ...

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """An int32 [num_rows, ceil(vocab_size / 32)] CPU bitmask."""
        ...
