"""The per-step token bitmask: filled on the host for the constrained rows, applied by the sampler.

`GrammarBitmask.fill(matchers, device)` is the runner's one call per step. With no matcher in the
batch it returns None at once (unconstrained batches pay nothing). Otherwise each constrained
row of a preallocated int32 [max_rows, ceil(V/32)] host buffer (pinned on CUDA) is filled by its
matcher, and it returns `(bitmask, row_index)`: the buffer's first B rows and the int64 indices
of the constrained rows on the logits' device. The sampler's `token_bitmask` hook
(`sampling_ops.apply_token_bitmask`) copies the bitmask to the device and masks those rows in
one op, before logprobs and the draw; unconstrained rows are not in `row_index`, so their logits
are untouched bit for bit.

Called on the runner thread after the forward pass was launched: on a GPU the host-side fill
overlaps the device work that produces the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cogvlm_ray.engine.structured.backend import GrammarMatcher


class GrammarBitmask:
    """Host buffer + fill, for one runner. `vocab_size` is the logits' width."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._host: torch.Tensor | None = None
        self.num_filled_steps = 0

    def _buffer(self, num_rows: int, pin: bool) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < num_rows:
            width = (self.vocab_size + 31) // 32
            rows = max(num_rows, 8 if self._host is None else 2 * self._host.shape[0])
            self._host = torch.empty((rows, width), dtype=torch.int32, pin_memory=pin)
        return self._host

    def fill(
        self, matchers: Sequence[GrammarMatcher | None], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int32 [B, ceil(V/32)] host bitmask, int64 [N] constrained rows on `device`), or None."""
        rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return None
        host = self._buffer(len(matchers), pin=device.type == "cuda")
        for i in rows:
            matcher = matchers[i]
            assert matcher is not None
            matcher.fill_bitmask(host, i)
        self.num_filled_steps += 1
        row_index = torch.tensor(rows, dtype=torch.long)
        if device.type == "cuda":
            row_index = row_index.pin_memory().to(device, non_blocking=True)
        return host[: len(matchers)], row_index
