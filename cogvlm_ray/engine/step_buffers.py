"""Persistent step-metadata buffers: a step's integer inputs built on the host, one copy to the device.

`StepBuffers` owns one int64 host tensor (pinned when the device is CUDA) and its device twin,
both allocated once for the engine's limits (`max_num_tokens` flat tokens, `max_num_seqs`
sequences, `max_blocks_per_seq` block-table columns) and carved into fixed sections:

    query_start_loc [S+1] | seq_lens [S] | sample_rows [S] | block_tables [S, max_blocks]
    | input_ids [T] | positions [T] | slot_mapping [T] | language_index [T] | vision_index [T]
    | image_token_index [T]

The runner writes a step's values into the host sections (numpy views, no torch ops), then
`copy_to_device()` issues ONE host-to-device copy of the host buffer up to the last section
the step used, and the model reads views of the device twin. Because the device tensors never
move, a CUDA-graph runner can capture `forward_flat` over fixed-size views of them
(`pad_decode_batch` fills the padding rows with values the kernels skip). On CPU the device
twin is the host buffer itself: no copy at all.

Reuse rule: the host buffer is overwritten by the next step, so a step's copy must have
completed before the next `begin()`. The engine guarantees it: each step ends by reading the
sampled ids back to the host, which waits for everything queued before, the copy included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cogvlm_ray.model.attention import AttentionMetadata
from cogvlm_ray.model.language import ExpertRouting

_PER_SEQ = ("seq_lens", "sample_rows")
_PER_TOKEN = (
    "input_ids",
    "positions",
    "slot_mapping",
    "language_index",
    "vision_index",
    "image_token_index",
)


class StepBuffers:
    """Fixed-address int64 buffers for one step's metadata (see the module docstring)."""

    def __init__(
        self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device | str
    ) -> None:
        self.device = torch.device(device)
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        sizes = {"query_start_loc": max_num_seqs + 1}
        sizes.update(dict.fromkeys(_PER_SEQ, max_num_seqs))
        sizes["block_tables"] = max_num_seqs * max_blocks_per_seq
        sizes.update(dict.fromkeys(_PER_TOKEN, max_num_tokens))
        self._offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, size in sizes.items():
            self._offsets[name] = (total, total + size)
            total += size
        pin = self.device.type == "cuda"
        self.host_buffer = torch.zeros(total, dtype=torch.int64, pin_memory=pin)
        self.device_buffer = (
            self.host_buffer
            if self.device.type == "cpu"
            else torch.zeros(total, dtype=torch.int64, device=self.device)
        )
        self._host_np = self.host_buffer.numpy()
        self._used_end = 0

    def fits(self, num_tokens: int, num_seqs: int, num_blocks: int) -> bool:
        return (
            num_tokens <= self.max_num_tokens
            and num_seqs <= self.max_num_seqs
            and num_blocks <= self.max_blocks_per_seq
        )

    def begin(self) -> None:
        """Start a step: nothing is marked for the copy yet."""
        self._used_end = 0

    def host_section(self, name: str) -> np.ndarray:
        """The writable host section `name` (1-D; `block_tables` is `[S, max_blocks]`); marks it for the copy."""
        start, end = self._offsets[name]
        self._used_end = max(self._used_end, end)
        view = self._host_np[start:end]
        if name == "block_tables":
            return view.reshape(self.max_num_seqs, self.max_blocks_per_seq)
        return view

    def device_section(self, name: str, length: int) -> torch.Tensor:
        """The first `length` entries of section `name` on the device (rows, for `block_tables`)."""
        start, end = self._offsets[name]
        view = self.device_buffer[start:end]
        if name == "block_tables":
            return view.view(self.max_num_seqs, self.max_blocks_per_seq)[:length]
        return view[:length]

    def copy_to_device(self) -> None:
        """The one host-to-device copy of the step (a no-op on CPU, where the two are one buffer)."""
        if self.device_buffer is not self.host_buffer and self._used_end:
            end = self._used_end
            self.device_buffer[:end].copy_(self.host_buffer[:end], non_blocking=True)

    def pad_decode_batch(self, num_seqs: int, padded_num_seqs: int) -> None:
        """Make rows `num_seqs .. padded_num_seqs - 1` of a decode batch (one token per sequence)
        inert: token 0 at position 0, slot -1 (the Triton KV write skips it), KV length 0 (the
        Triton decode kernel writes zeros). For fixed-shape (graph) replays; call after the
        real rows are written."""
        if padded_num_seqs > self.max_num_seqs or padded_num_seqs > self.max_num_tokens:
            raise ValueError(f"cannot pad to {padded_num_seqs} rows")
        rows = slice(num_seqs, padded_num_seqs)
        self.host_section("input_ids")[rows] = 0
        self.host_section("positions")[rows] = 0
        self.host_section("slot_mapping")[rows] = -1
        self.host_section("seq_lens")[rows] = 0
        self.host_section("query_start_loc")[num_seqs + 1 : padded_num_seqs + 1] = np.arange(
            num_seqs + 1, padded_num_seqs + 1
        )


@dataclass
class StagedStep:
    """Device views of one step's metadata (valid until the next `StepBuffers.stage`)."""

    input_ids: torch.Tensor
    """int64 [T]."""
    positions: torch.Tensor
    """int64 [T]."""
    attn_metadata: AttentionMetadata
    expert_routing: ExpertRouting
    image_token_index: torch.Tensor | None
    """int64 [N_img]: flat rows receiving image rows; None when the step has none."""
    sample_rows: torch.Tensor
    """int64 [B_sampled]: flat row of the last new token of each sampled sequence."""


def stage_step(
    buffers: StepBuffers,
    *,
    token_ids: list[int],
    positions: list[int],
    is_vision: list[bool],
    is_image: list[bool],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    sampled_seqs: list[int],
    block_size: int,
) -> StagedStep:
    """Write a step into `buffers` on the host, copy it once, and return the device views.

    Sequence b has `context_lens[b]` cached tokens and `query_lens[b]` new ones (flat rows in
    order); `is_vision` / `is_image` flag each flat row; `sampled_seqs` are the sequences
    whose last new token is sampled.
    """
    num_tokens, num_seqs = len(token_ids), len(query_lens)
    width = max((len(t) for t in block_tables), default=0)
    if not buffers.fits(num_tokens, num_seqs, width):
        raise ValueError(
            f"step of {num_tokens} tokens / {num_seqs} seqs / {width} blocks exceeds the buffers"
        )
    buffers.begin()
    qsl = buffers.host_section("query_start_loc")
    qsl[0] = 0
    np.cumsum(query_lens, out=qsl[1 : num_seqs + 1])
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    buffers.host_section("seq_lens")[:num_seqs] = seq_lens
    tables = buffers.host_section("block_tables")
    slots = buffers.host_section("slot_mapping")
    offset = 0
    for b, (q, c, table) in enumerate(zip(query_lens, context_lens, block_tables, strict=True)):
        if len(table) * block_size < q + c:
            raise ValueError(f"block table has {len(table)} blocks, sequence of {q + c} tokens needs more")
        tables[b, : len(table)] = table
        if q == 1:  # a decode: no numpy round trip for one slot
            slots[offset] = table[c // block_size] * block_size + c % block_size
        elif q:
            j = np.arange(c, c + q)
            slots[offset : offset + q] = np.asarray(table)[j // block_size] * block_size + j % block_size
        offset += q
    buffers.host_section("input_ids")[:num_tokens] = token_ids
    buffers.host_section("positions")[:num_tokens] = positions
    sample = buffers.host_section("sample_rows")
    sample[: len(sampled_seqs)] = qsl[1:][sampled_seqs] - 1
    num_vision = num_images = 0
    if any(is_vision):
        vision = np.flatnonzero(is_vision)
        language = np.flatnonzero(~np.asarray(is_vision, dtype=bool))
        num_vision, num_language = len(vision), len(language)
        buffers.host_section("vision_index")[:num_vision] = vision
        buffers.host_section("language_index")[:num_language] = language
    if any(is_image):
        image = np.flatnonzero(is_image)
        num_images = len(image)
        buffers.host_section("image_token_index")[:num_images] = image
    buffers.copy_to_device()

    meta = AttentionMetadata(
        query_start_loc=buffers.device_section("query_start_loc", num_seqs + 1),
        seq_lens=buffers.device_section("seq_lens", num_seqs),
        slot_mapping=buffers.device_section("slot_mapping", num_tokens),
        block_tables=buffers.device_section("block_tables", num_seqs)[:, :width],
        block_size=block_size,
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
    )
    routing = (
        ExpertRouting(
            language_index=buffers.device_section("language_index", num_tokens - num_vision),
            vision_index=buffers.device_section("vision_index", num_vision),
        )
        if num_vision
        else ExpertRouting.language_only()
    )
    return StagedStep(
        input_ids=buffers.device_section("input_ids", num_tokens),
        positions=buffers.device_section("positions", num_tokens),
        attn_metadata=meta,
        expert_routing=routing,
        image_token_index=buffers.device_section("image_token_index", num_images) if num_images else None,
        sample_rows=buffers.device_section("sample_rows", len(sampled_seqs)),
    )
