"""Per-request token counts on the device, for the repetition / presence / frequency penalties.

One row per request that uses a penalty: `prompt_mask` (bool [slots, V], the prompt's tokens)
and `output_counts` (int32 [slots, V], how often each token was generated). A row is filled
once from the host when the request first needs it; after that every step adds the sampled
ids on the device (`add_sampled`, one scatter for the batch), so no step walks token lists on
the host. The host keeps only how many output tokens each row has counted: if that ever
disagrees with the request's output (a sampled id that was not appended), the row is rebuilt.
Rows are reused when requests finish; the table doubles when more requests hold rows than it
has (preempted requests keep theirs while they wait).
"""

from __future__ import annotations

import torch


class TokenCounts:
    def __init__(self, vocab_size: int, device: torch.device, num_slots: int = 32) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.prompt_mask = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)
        self._slots: dict[str, int] = {}
        self._num_counted: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return self.prompt_mask.shape[0]

    def slot_for(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int]) -> int:
        """The request's row, (re)filled from the host when it is new or out of sync."""
        slot = self._slots.get(request_id)
        if slot is not None and self._num_counted[request_id] == len(output_token_ids):
            return slot
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._slots[request_id] = self._free.pop()
        self._fill(slot, prompt_token_ids, output_token_ids)
        self._num_counted[request_id] = len(output_token_ids)
        return slot

    def rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_mask, output_counts) rows for int64 slots [P]."""
        return self.prompt_mask[slots], self.output_counts[slots]

    def add_sampled(self, request_ids: list[str], slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one sampled id per row (device tensors [P]); the requests will append them."""
        ones = torch.ones_like(token_ids, dtype=torch.int32)
        self.output_counts.index_put_((slots, token_ids), ones, accumulate=True)
        for request_id in request_ids:
            self._num_counted[request_id] += 1

    def release(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            del self._num_counted[request_id]
            self._free.append(slot)

    def _fill(self, slot: int, prompt_token_ids: list[int], output_token_ids: list[int]) -> None:
        prompt, output = (self._to_device(ids) for ids in (prompt_token_ids, output_token_ids))
        self.prompt_mask[slot].zero_().index_fill_(0, prompt, True)
        counts = self.output_counts[slot].zero_()
        counts.index_put_((output,), torch.ones_like(output, dtype=torch.int32), accumulate=True)

    def _to_device(self, ids: list[int]) -> torch.Tensor:
        host = torch.tensor(ids, dtype=torch.long)
        if self.device.type == "cuda":  # pinned: an asynchronous copy, no wait for running kernels
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _grow(self) -> None:
        old = self.num_slots
        self.prompt_mask = torch.cat([self.prompt_mask, torch.zeros_like(self.prompt_mask)])
        self.output_counts = torch.cat([self.output_counts, torch.zeros_like(self.output_counts)])
        self._free.extend(range(2 * old - 1, old - 1, -1))
