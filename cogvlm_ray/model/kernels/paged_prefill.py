"""Varlen causal paged attention for prefill chunks (and any mix with decodes), one launch per layer.

Must equal `attention.reference_paged_attention` on any step (fp32: to float32 rounding; bf16:
to bf16 rounding of the probabilities before `p @ V`): query i of a sequence with `c` cached
tokens sees keys `0 .. c + i`, read in place from the paged cache through the block table, so
chunked prefill after cached context (a prefix-cache hit, a second chunk) needs nothing more.

Grid `(ceil(max_query_len / BLOCK_M), num_seqs, num_heads)`: a program takes `BLOCK_M`
queries of one sequence and one query head (programs past a sequence's query length return),
and runs a float32 online softmax over key tiles of `BLOCK_N`, stopping at the last key its
queries can see. Decode rows are just sequences with one query, which is how a mixed step
covers every sequence in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cogvlm_ray.model.kernels import dot_operands, is_interpreted, next_power_of_2


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # cached tokens before this chunk
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The last query of this tile sees keys up to context + its index.
    kv_end = tl.minimum(seq_len, context + (m_block + 1) * BLOCK_M)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + offs_n
        n_ok = pos < kv_end
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
        )  # [BLOCK_M, BLOCK_N]
        allowed = n_ok[None, :] & (pos[None, :] <= context + offs_m[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
        # Key 0 is visible to every query, so after the first tile m_i is finite for every row.
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
    denom = tl.where(l_i > 0, l_i, 1.0)
    out = acc / denom[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int = 32,
    block_n: int = 32,
) -> torch.Tensor:
    """Causal attention of every sequence's new queries over its paged keys (cached + new).

    query `[T, H, D]` (sequences concatenated as `query_start_loc` int `[B+1]` says, rotated);
    caches `[num_blocks, block_size, Hkv, D]` with this step's K/V already written; block_tables
    int `[B, max_blocks]`; seq_lens int `[B]` (KV length after the step); `max_query_len` a
    host int (it sizes the grid, so no device read is needed). Returns `[T, H, D]`.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not match cache {tuple(k_cache.shape)}")
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("query and caches must be contiguous in head_dim")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] < num_seqs:
        raise ValueError("query_start_loc needs B+1 entries and block_tables B rows")
    dot_dtype, precision = dot_operands(k_cache.dtype, is_interpreted(_paged_prefill_kernel))
    out = torch.empty_like(query) if out is None else out
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _paged_prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
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
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
    )
    return out
