"""Paged-KV attention over a flat batch of new tokens (prefill chunks and decodes mixed).

Owns `AttentionMetadata` (the per-step description the engine builds), the contract of a
backend (`AttentionBackend`: write the new K/V, attend over the paged cache) and the table of
backends, `ATTENTION_BACKENDS`:

* "reference": `write_kv_cache` + `reference_paged_attention` (plain torch, explicit float32
  softmax; the readable definition every other backend must equal);
* "sdpa": PyTorch SDPA over keys gathered from the block tables (the default on CPU);
* "triton": the kernels of `kernels/` (paged decode, varlen prefill, KV write), which read the
  cache in place (the default on CUDA).

It does not own the cache allocation (the engine does) or the projections (`language.py`).

Cache layout per layer: `k_cache`, `v_cache` each `[num_blocks, block_size, num_kv_heads, head_dim]`;
token `j` of a sequence lives at `block_tables[b][j // block_size] * block_size + j % block_size`.
Keys are stored after rotary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


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
    _step_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Tensors derived from this step's metadata once and reused by every layer (key masks)."""
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
"""(query `[T, H, D]`, k_cache, v_cache, metadata, scale) -> `[T, H, D]`, as `reference_paged_attention`."""
WriteKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(key, value `[T, Hkv, D]`, k_cache, v_cache, slot_mapping `[T]`) -> None, as `write_kv_cache`."""


@dataclass(frozen=True)
class AttentionBackend:
    """What a decoder layer calls: store this step's K/V, then attend over the paged cache.

    Both run inside `forward_flat`, so neither may sync the host with the device (no `.item()`,
    `.tolist()`, `nonzero()` or `torch.tensor(list)` on a decode step; see the sync-guard test).
    """

    write_kv: WriteKVFn
    attend: PagedAttentionFn


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
    bottom-right aligned when it follows cached context). On a decode-only step the rows are
    the sequences, so no index is built; the key mask is built once per step, not per layer.
    """
    query_lens, seq_lens = meta.host_lens()
    if meta.max_query_len <= 1 and query.shape[0] == meta.num_seqs:
        return _decode_attention(query, k_cache, v_cache, meta, scale, max(seq_lens, default=0))
    out = torch.empty_like(query)
    decode_rows = [b for b, q in enumerate(query_lens) if q == 1]
    if decode_rows:
        seq_index, token_index = _decode_index(meta, query_lens, decode_rows, query.device)
        o = _decode_attention(
            query.index_select(0, token_index),
            k_cache,
            v_cache,
            meta,
            scale,
            max(seq_lens[b] for b in decode_rows),
            seq_index,
        )
        out.index_copy_(0, token_index, o)
    offset = 0
    for b, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if q_len > 1:
            q = query[offset : offset + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            k = gather_kv(k_cache, meta.block_tables[b], s_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
            v = gather_kv(v_cache, meta.block_tables[b], s_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
            context = s_len - q_len
            if context == 0:
                o = _sdpa("prefill", q, k, v, None, True, scale)
            else:
                allowed = torch.arange(s_len, device=q.device)[None, :] <= (
                    context + torch.arange(q_len, device=q.device)[:, None]
                )
                o = _sdpa("chunked_prefill", q, k, v, allowed, False, scale)
            out[offset : offset + q_len] = o.squeeze(0).transpose(0, 1)
        offset += q_len
    return out


def _decode_index(
    meta: AttentionMetadata, query_lens: list[int], rows: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence rows, flat token rows) of the decodes of a mixed step: built once per step."""
    if "decode_seq_index" not in meta._step_cache:
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        meta._step_cache["decode_seq_index"] = torch.tensor(rows, dtype=torch.long, device=device)
        meta._step_cache["decode_token_index"] = torch.tensor(
            [starts[b] for b in rows], dtype=torch.long, device=device
        )
    return meta._step_cache["decode_seq_index"], meta._step_cache["decode_token_index"]


def _decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    max_len: int,
    seq_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SDPA call for single-token queries `[Bd, H, D]` of the sequences `seq_index` (all if None)."""
    block_size = k_cache.shape[1]
    num_blocks = -(-max_len // block_size)
    tables = meta.block_tables if seq_index is None else meta.block_tables.index_select(0, seq_index)
    tables = tables[:, :num_blocks]  # [Bd, nb]
    # [Bd, nb, bs, Hkv, D] -> [Bd, Hkv, nb*bs, D]
    k = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(query.dtype)
    v = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2).to(query.dtype)
    mask_key = "decode_key_mask" if seq_index is None else "mixed_decode_key_mask"
    key_ok = meta._step_cache.get(mask_key)
    if key_ok is None:
        lens = meta.seq_lens if seq_index is None else meta.seq_lens.index_select(0, seq_index)
        key_ok = torch.arange(max_len, device=query.device)[None, :] < lens[:, None]  # [Bd, S]
        key_ok = meta._step_cache[mask_key] = key_ok[:, None, None, :]
    o = _sdpa("decode", query.unsqueeze(2), k, v, key_ok, False, scale)  # [Bd, H, 1, D]
    return o.squeeze(2)


_SDPA_REPEAT_KV: dict[tuple[str, str, torch.dtype], bool] = {}
"""Per (call kind, device type, dtype): whether K/V are repeated to the query heads because the
GQA call would run SDPA's MATH kernel and the repeated one would not. Decided and logged once."""


def _sdpa(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """`scaled_dot_product_attention` with GQA, avoiding the MATH fallback where repeating K/V can."""
    key = (kind, q.device.type, q.dtype)
    repeat = _SDPA_REPEAT_KV.get(key)
    if repeat is None:
        repeat = _SDPA_REPEAT_KV[key] = _plan_sdpa(kind, q, k, v, mask, is_causal, scale)
    if repeat:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
    )


def _plan_sdpa(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> bool:
    """Ask SDPA's dispatcher which kernel it picks (for GQA and for repeated K/V); log it once."""
    from torch.nn.attention import SDPBackend

    try:
        chosen = SDPBackend(
            torch._fused_sdp_choice(q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=True)
        )
        repeated = SDPBackend.MATH
        if chosen == SDPBackend.MATH and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            kr = k.repeat_interleave(group, dim=1)
            repeated = SDPBackend(torch._fused_sdp_choice(q, kr, kr, mask, 0.0, is_causal, scale=scale))
    except Exception as exc:  # a private API: never let it break attention
        logger.info("SDPA %s on %s/%s: backend not introspectable (%r)", kind, q.device.type, q.dtype, exc)
        return False
    repeat = chosen == SDPBackend.MATH and repeated != SDPBackend.MATH
    logger.info(
        "SDPA %s on %s/%s: %s%s",
        kind,
        q.device.type,
        q.dtype,
        chosen.name,
        f" for GQA, so K/V are repeated to the query heads to run {repeated.name}" if repeat else "",
    )
    return repeat


def triton_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Same contract as `reference_paged_attention`, with the Triton kernels of `kernels/`.

    A decode-only step (every query length 1, one row per sequence) runs the decode kernel;
    any other step one varlen launch of the prefill kernel, decodes included. Both read the
    paged cache in place. `max_query_len` is a host int, so nothing here reads the device.
    """
    from cogvlm_ray.model.kernels.paged_decode import paged_decode_attention
    from cogvlm_ray.model.kernels.paged_prefill import paged_prefill_attention

    if meta.max_query_len <= 1 and query.shape[0] == meta.num_seqs:
        return paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    return paged_prefill_attention(
        query,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        scale,
    )


def triton_write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`write_kv_cache` as one Triton launch (`kernels/kv_write.py`); negative slots are skipped."""
    from cogvlm_ray.model.kernels.kv_write import write_kv_cache_triton

    write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "reference": AttentionBackend(write_kv_cache, reference_paged_attention),
    "sdpa": AttentionBackend(write_kv_cache, sdpa_paged_attention),
    "triton": AttentionBackend(triton_write_kv_cache, triton_paged_attention),
}
