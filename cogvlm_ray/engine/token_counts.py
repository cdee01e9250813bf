"""Per-request token state on the device, for the repetition / presence / frequency penalties.

One slot per request that uses a penalty:
* `seen_ids` (int64 [slots, capacity]): the prompt ids then every generated id, the tail padded
  with the row's first id. The repetition penalty gathers and scatters the logits at these
  ids (`[P, L]` with L the longest row this step, ~2.4K for an image prompt instead of the
  128K vocabulary); repeated ids are harmless, since every copy writes the same value.
* `output_counts` (int32 [slots, V]): how often each token was generated, for OpenAI's
  frequency / presence penalties.

A slot is filled once from the host when the request first needs it; after that every step
writes the sampled ids on the device (`add_sampled`, one scatter each for the batch), so no
step walks token lists on the host. The host keeps only how many output tokens each slot has
seen: if that ever disagrees with the request's output (a sampled id that was not appended),
the slot is refilled. Slots are reused when requests finish; the table doubles when more
requests hold slots than it has (preempted requests keep theirs while they wait) and when a
row outgrows its capacity.
"""

from __future__ import annotations

import torch


class TokenCounts:
    def __init__(
        self, vocab_size: int, device: torch.device, num_slots: int = 32, capacity: int = 4096
    ) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.seen_ids = torch.zeros(num_slots, capacity, dtype=torch.long, device=device)
        self.output_counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)
        self._slots: dict[str, int] = {}
        self._num_prompt: dict[str, int] = {}
        self._num_counted: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return self.seen_ids.shape[0]

    @property
    def capacity(self) -> int:
        return self.seen_ids.shape[1]

    def slot_for(
        self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int]
    ) -> tuple[int, int]:
        """(slot, number of ids seen): the request's row, (re)filled from the host when it is
        new or out of sync. The next sampled id goes to position `number of ids seen`."""
        slot = self._slots.get(request_id)
        num_seen = len(prompt_token_ids) + len(output_token_ids)
        if num_seen + 1 > self.capacity:
            self._grow_capacity(num_seen + 1)
        if slot is not None and self._num_counted[request_id] == len(output_token_ids):
            return slot, num_seen
        if slot is None:
            if not self._free:
                self._grow_slots()
            slot = self._slots[request_id] = self._free.pop()
        self._fill(slot, prompt_token_ids, output_token_ids)
        self._num_counted[request_id] = len(output_token_ids)
        return slot, num_seen

    def rows(self, slots: torch.Tensor, num_seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen_ids [P, num_seen], output_counts [P, V]) for int64 slots [P]; `num_seen` is the
        longest of these rows (shorter ones are padded with ids they have seen)."""
        return self.seen_ids[slots, :num_seen], self.output_counts[slots]

    def add_sampled(
        self, request_ids: list[str], slots: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor
    ) -> None:
        """Record one sampled id per row (device tensors [P]); the requests will append them."""
        self.seen_ids[slots, positions] = token_ids
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
        ids = self._to_device(prompt_token_ids + output_token_ids)
        output = self._to_device(output_token_ids)
        row = self.seen_ids[slot]
        row.fill_(prompt_token_ids[0])  # the padding: an id the row has seen
        row[: ids.shape[0]] = ids
        counts = self.output_counts[slot].zero_()
        counts.index_put_((output,), torch.ones_like(output, dtype=torch.int32), accumulate=True)

    def _to_device(self, ids: list[int]) -> torch.Tensor:
        host = torch.tensor(ids, dtype=torch.long)
        if self.device.type == "cuda":  # pinned: an asynchronous copy, no wait for running kernels
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _grow_slots(self) -> None:
        old = self.num_slots
        self.seen_ids = torch.cat([self.seen_ids, torch.zeros_like(self.seen_ids)])
        self.output_counts = torch.cat([self.output_counts, torch.zeros_like(self.output_counts)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def _grow_capacity(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        pad = self.seen_ids[:, :1].expand(-1, capacity - self.capacity)  # first ids: seen already
        self.seen_ids = torch.cat([self.seen_ids, pad], dim=1)
