"""Paged-KV attention over a flat batch of new tokens (prefill chunks and decodes mixed).

Owns `AttentionMetadata` (the per-step description the engine builds), the cache write and two
attention implementations with the same signature: `reference_paged_attention` (plain torch,
explicit float32 softmax; the readable definition) and `sdpa_paged_attention` (PyTorch SDPA,
used by default). It does not own the cache allocation (the engine does) or the projections
(`language.py`).

Cache layout per layer: `k_cache`, `v_cache` each `[num_blocks, block_size, num_kv_heads, head_dim]`;
token `j` of a sequence lives at `block_tables[b][j // block_size] * block_size + j % block_size`.
Keys are stored after rotary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """One engine step: a flat batch of T new tokens from B sequences, sequences concatenated."""

    query_start_loc: torch.Tensor
    """int64 [B+1]; new tokens of seq b are flat[query_start_loc[b]:query_start_loc[b+1]]."""
    seq_lens: torch.Tensor
    """int64 [B]; KV length of seq b AFTER this step (cached context + new tokens)."""
    slot_mapping: torch.Tensor
    """int64 [T]; cache slot (block_id * block_size + offset) where each new token's K/V goes."""
    block_tables: torch.Tensor
    """int64 [B, max_blocks]; padded with 0; only the first ceil(seq_len / block_size) are used."""
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int] = field(default_factory=list)
    """Host copies of the per-sequence lengths, so the attention loop never syncs a device."""
    seq_lens_cpu: list[int] = field(default_factory=list)
    _per_device: dict[torch.device, AttentionMetadata] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Describe a step: sequence b has `context_lens[b]` cached tokens and `query_lens[b]` new ones."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError("query_lens, context_lens and block_tables must have one entry per sequence")
        seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables, strict=True):
            needed = math.ceil((q + c) / block_size)
            if len(table) < needed:
                raise ValueError(
                    f"block table has {len(table)} blocks, sequence of {q + c} tokens needs {needed}"
                )
            slots.extend(table[j // block_size] * block_size + j % block_size for j in range(c, c + q))
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device).reshape(
                len(block_tables), max_blocks
            ),
            block_size=block_size,
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=seq_lens,
        )

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    def host_lens(self) -> tuple[list[int], list[int]]:
        """(query_lens, seq_lens) as Python lists (synced once if built by hand on a device)."""
        if not self.query_lens_cpu and self.num_seqs:
            self.query_lens_cpu = (self.query_start_loc[1:] - self.query_start_loc[:-1]).tolist()
            self.seq_lens_cpu = self.seq_lens.tolist()
        return self.query_lens_cpu, self.seq_lens_cpu

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """This metadata on `device`; copies are cached per device for the step (sharded models)."""
        device = torch.device(device)
        if self.slot_mapping.device == device:
            return self
        if device not in self._per_device:
            query_lens, seq_lens = self.host_lens()
            self._per_device[device] = AttentionMetadata(
                query_start_loc=self.query_start_loc.to(device),
                seq_lens=self.seq_lens.to(device),
                slot_mapping=self.slot_mapping.to(device),
                block_tables=self.block_tables.to(device),
                block_size=self.block_size,
                max_query_len=self.max_query_len,
                max_seq_len=self.max_seq_len,
                query_lens_cpu=query_lens,
                seq_lens_cpu=seq_lens,
            )
        return self._per_device[device]


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values `[T, num_kv_heads, head_dim]` at their cache slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached rows of one sequence: `[seq_len, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    rows = cache.index_select(0, block_table[:num_blocks])  # [num_blocks, block_size, Hkv, D]
    return rows.reshape(-1, *cache.shape[2:])[:seq_len]


PagedAttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor
]


def reference_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys (plain torch).

    query `[T, H, D]` (already rotated); returns `[T, H, D]`. Query i of a sequence with context c
    sees keys 0..c+i. Scores and softmax in float32, as the official explicit-mask path does.
    """
    num_heads = query.shape[1]
    out = torch.empty_like(query)
    query_lens, seq_lens = meta.host_lens()
    start = 0
    for b, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if q_len == 0:
            continue
        q = query[start : start + q_len].float()  # [q, H, D]
        k = gather_kv(k_cache, meta.block_tables[b], s_len).float()
        v = gather_kv(v_cache, meta.block_tables[b], s_len).float()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # KV head k serves query heads group*k ... group*k+group-1
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        context = s_len - q_len
        allowed = torch.arange(s_len, device=q.device)[None, :] <= (
            context + torch.arange(q_len, device=q.device)[:, None]
        )
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        start += q_len
    return out


def sdpa_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Same contract as `reference_paged_attention`, computed with PyTorch SDPA.

    Single-token queries (decodes) are batched into one SDPA call over keys gathered from
    their block tables with a key-length mask; each prefill chunk gets its own call (causal,
    bottom-right aligned when it follows cached context).
    """
    out = torch.empty_like(query)
    query_lens, seq_lens = meta.host_lens()
    decode_rows = [b for b, q in enumerate(query_lens) if q == 1]
    if decode_rows:
        _decode_attention(query, k_cache, v_cache, meta, scale, decode_rows, out)
    offset = 0
    for b, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if q_len > 1:
            q = query[offset : offset + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            k = gather_kv(k_cache, meta.block_tables[b], s_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
            v = gather_kv(v_cache, meta.block_tables[b], s_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
            context = s_len - q_len
            if context == 0:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:
                allowed = torch.arange(s_len, device=q.device)[None, :] <= (
                    context + torch.arange(q_len, device=q.device)[:, None]
                )
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
            out[offset : offset + q_len] = o.squeeze(0).transpose(0, 1)
        offset += q_len
    return out


def _decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    rows: list[int],
    out: torch.Tensor,
) -> None:
    """One SDPA call for all single-token sequences; writes their rows of `out`."""
    query_lens, seq_lens = meta.host_lens()
    flat_index = []
    offset = 0
    for q_len in query_lens:
        if q_len == 1:
            flat_index.append(offset)
        offset += q_len
    max_len = max(seq_lens[b] for b in rows)
    block_size = k_cache.shape[1]
    num_blocks = -(-max_len // block_size)
    row_index = torch.tensor(rows, dtype=torch.long, device=query.device)
    tables = meta.block_tables.index_select(0, row_index)[:, :num_blocks]  # [Bd, nb]
    # [Bd, nb, bs, Hkv, D] -> [Bd, Hkv, nb*bs, D]
    k = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(query.dtype)
    v = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(query.dtype)
    lens = meta.seq_lens.index_select(0, row_index)
    key_ok = torch.arange(max_len, device=query.device)[None, :] < lens[:, None]  # [Bd, S]
    index = torch.tensor(flat_index, dtype=torch.long, device=query.device)
    q = query.index_select(0, index).unsqueeze(2)  # [Bd, H, 1, D]
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_ok[:, None, None, :], scale=scale, enable_gqa=True
    )
    out.index_copy_(0, index, o.squeeze(2))


ATTENTION_BACKENDS: dict[str, PagedAttentionFn] = {
    "reference": reference_paged_attention,
    "sdpa": sdpa_paged_attention,
}
