"""Decode paged attention (one new token per sequence), GQA, straight from the paged cache.

Must equal `attention.reference_paged_attention` on a step whose query lengths are all 1
(fp32: to float32 rounding; bf16: to bf16 rounding of the probabilities before `p @ V`).

One program per (sequence, KV head): it loads the `GROUP = H / Hkv` query heads that share the
KV head (padded to 16 rows so `tl.dot` has a legal shape on GPUs), walks the sequence's keys
in tiles of `BLOCK_N` (each key's physical row found through the block table, so any block
size works), and keeps an online softmax in float32. A sequence of length 0 (a padded row of
a fixed-shape batch) gets zeros. No split-KV: at batch >= 8 there are already >= 64 programs
per layer; long single-sequence contexts are the case a split would help (unmeasured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cogvlm_ray.model.kernels import dot_operands, is_interpreted, next_power_of_2


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # query heads served by this KV head

    q = tl.load(
        q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + offs_n
        n_ok = pos < seq_len
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + pos // PAGE_SIZE, mask=n_ok, other=0)
        within = pos % PAGE_SIZE
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_cache_ptr
            + block_ids[:, None] * stride_kb
            + within[:, None] * stride_ks
            + kv_head * stride_kh
            + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        scores = (
            tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        )  # [BLOCK_G, BLOCK_N]
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        # Every tile has >= 1 valid key, so m_new is finite and alpha never sees (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr
            + block_ids[:, None] * stride_vb
            + within[:, None] * stride_vs
            + kv_head * stride_vh
            + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new
    denom = tl.where(l_i > 0, l_i, 1.0)  # seq_len 0 (padding): acc is 0, so the row is 0
    out = acc / denom[:, None]
    tl.store(
        out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None] & d_ok[None, :],
    )


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged keys.

    query `[B, H, D]` (row b = sequence b, already rotated); caches `[num_blocks, block_size,
    Hkv, D]`; block_tables int `[B, >= ceil(max seq_len / block_size)]`; seq_lens int `[B]` (KV
    length including the new token, whose K/V is already written). Returns `[B, H, D]`.
    """
    num_seqs, num_heads, head_dim = query.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not match cache {tuple(k_cache.shape)}")
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("query and caches must be contiguous in head_dim")
    if block_tables.shape[0] < num_seqs or seq_lens.shape[0] < num_seqs:
        raise ValueError("block_tables and seq_lens need one row per query row")
    dot_dtype, precision = dot_operands(k_cache.dtype, is_interpreted(_paged_decode_kernel))
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        query,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        scale,
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_G=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
    )
    return out
