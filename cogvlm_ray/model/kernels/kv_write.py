"""The KV-cache write: each new token's keys and values stored at its cache slot, in one launch.

Must equal `attention.write_kv_cache` exactly (a copy, with the cast to the cache dtype) for
non-negative slots. A negative slot is skipped: that is how a padded row of a fixed-shape
batch (CUDA graphs) writes nothing. Rotary stays in torch (it is shared with the queries).

One program per token: it loads the token's `[Hkv, D]` keys and values and stores them at
`slot // block_size`, `slot % block_size` of the `[num_blocks, block_size, Hkv, D]` caches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cogvlm_ray.model.kernels import next_power_of_2


@triton.jit
def _kv_write_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ckb,
    stride_cks,
    stride_ckh,
    stride_cvb,
    stride_cvs,
    stride_cvh,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    block = slot // PAGE_SIZE
    within = slot % PAGE_SIZE
    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
    tl.store(
        k_cache_ptr
        + block * stride_ckb
        + within * stride_cks
        + offs_h[:, None] * stride_ckh
        + offs_d[None, :],
        k.to(k_cache_ptr.dtype.element_ty),
        mask=ok,
    )
    tl.store(
        v_cache_ptr
        + block * stride_cvb
        + within * stride_cvs
        + offs_h[:, None] * stride_cvh
        + offs_d[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask=ok,
    )


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store keys/values `[T, Hkv, D]` at `slot_mapping` int `[T]` (negative: skip) of the caches."""
    num_tokens, num_kv_heads, head_dim = key.shape
    _, page_size, cache_heads, cache_dim = k_cache.shape
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"keys {tuple(key.shape)} do not match cache {tuple(k_cache.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("keys, values and caches must be contiguous in head_dim")
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {num_tokens} tokens")
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        PAGE_SIZE=page_size,
    )
