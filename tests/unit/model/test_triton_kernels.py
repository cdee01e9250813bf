"""The Triton kernels equal the plain-torch references (interpreted on CPU, compiled on CUDA).

Every case uses shuffled, non-contiguous block tables and lengths that are not block multiples.
Tolerances: float32 `atol = rtol = 1e-5` (observed ~3e-7: only the summation order differs);
bfloat16 `atol = rtol = 2e-2` (one bf16 rounding of the output, ~8e-3 relative, plus the
kernel's online softmax vs the reference's one-pass softmax). The KV write is exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from cogvlm_ray.model import AttentionMetadata, CogVLM2ForCausalLM
from cogvlm_ray.model.attention import reference_paged_attention, write_kv_cache
from tests.triton_interpreter import kernel_device

from .conftest import PagedRunner, decode_input, load_case, prompt_inputs

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module", autouse=True)
def device():
    with kernel_device() as device:
        yield device


def paged_case(
    query_lens: list[int],
    context_lens: list[int],
    *,
    block_size: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random query + caches + metadata; each sequence's blocks are drawn from a shuffled pool."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil((q + c) / block_size) for q, c in zip(query_lens, context_lens, strict=True)]
    num_blocks = sum(needed) + 7
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[pool.pop() for _ in range(n)] for n in needed]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device=device)
    return query.to(device), k_cache.to(device), v_cache.to(device), meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "block_size"), [(4, 2, 4), (8, 2, 16), (4, 4, 8), (6, 1, 4)]
)
def test_decode_kernel_equals_reference(device, dtype, num_heads, num_kv_heads, block_size) -> None:
    from cogvlm_ray.model.kernels.paged_decode import paged_decode_attention

    context = [0, 4, 16, 70]  # KV lengths 1, 5, 17, 71: the first and last blocks partly filled
    query, k_cache, v_cache, meta = paged_case(
        [1] * len(context), context, block_size=block_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, dtype=dtype, device=device,
    )  # fmt: skip
    got = paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25)
    want = reference_paged_attention(query, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_equals_reference_on_a_mixed_step(device, dtype) -> None:
    """Decodes, a fresh prefill longer than one query tile, and chunked prefills after cached context."""
    from cogvlm_ray.model.kernels.paged_prefill import paged_prefill_attention

    query_lens = [1, 45, 1, 7, 13]
    context_lens = [9, 0, 30, 21, 3]
    query, k_cache, v_cache, meta = paged_case(query_lens, context_lens, dtype=dtype, seed=1, device=device)
    got = paged_prefill_attention(
        query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        meta.max_query_len, 0.25, block_m=16, block_n=16,
    )  # fmt: skip
    want = reference_paged_attention(query, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


def test_triton_backend_picks_a_kernel_per_step_and_equals_reference(device) -> None:
    from cogvlm_ray.model.attention import ATTENTION_BACKENDS

    triton_attend = ATTENTION_BACKENDS["triton"].attend
    for query_lens, context_lens in (([1, 1, 1], [6, 0, 13]), ([3, 1, 9], [0, 5, 4])):
        query, k_cache, v_cache, meta = paged_case(
            query_lens, context_lens, num_heads=8, seed=2, device=device
        )
        torch.testing.assert_close(
            triton_attend(query, k_cache, v_cache, meta, 0.3),
            reference_paged_attention(query, k_cache, v_cache, meta, 0.3),
            **TOLERANCE[torch.float32],
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_kernel_equals_write_kv_cache(device, dtype) -> None:
    from cogvlm_ray.model.kernels.kv_write import write_kv_cache_triton

    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(10, 4, 2, 16, generator=gen).to(dtype)
    v_cache = torch.randn(10, 4, 2, 16, generator=gen).to(dtype)
    # In the model K/V already have the cache dtype (the interpreter's float32 -> bf16 cast
    # rounds differently from torch's, so a cast would not be bit-exact here).
    key = torch.randn(6, 2, 16, generator=gen).to(dtype)
    value = torch.randn(6, 2, 16, generator=gen).to(dtype)
    slots = torch.tensor([37, 2, -1, 19, 20, 8])  # -1: a padding row, skipped
    k_cache, v_cache, key, value, slots = (t.to(device) for t in (k_cache, v_cache, key, value, slots))
    got_k, got_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_triton(key, value, got_k, got_v, slots)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    write_kv_cache(key[keep], value[keep], want_k, want_v, slots[keep])
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_decode_kernel_padding_rows_are_zero_and_leave_real_rows_alone(device) -> None:
    from cogvlm_ray.model.kernels.paged_decode import paged_decode_attention

    query, k_cache, v_cache, meta = paged_case([1, 1], [6, 10], seed=4, device=device)
    alone = paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25)
    padded_query = torch.cat([query, torch.randn(2, *query.shape[1:], device=device)])
    tables = torch.cat([meta.block_tables, meta.block_tables.new_zeros(2, meta.block_tables.shape[1])])
    seq_lens = torch.cat([meta.seq_lens, meta.seq_lens.new_zeros(2)])
    padded = paged_decode_attention(padded_query, k_cache, v_cache, tables, seq_lens, 0.25)
    assert torch.equal(padded[:2], alone)
    assert torch.equal(padded[2:], torch.zeros_like(padded[2:]))


def test_triton_backend_through_the_model_equals_reference(device, tiny_model: CogVLM2ForCausalLM) -> None:
    """Image prefill + text prefill in one step, then a decode step, on the golden tiny model."""
    if device.type != "cpu":
        pytest.skip("the session's tiny model lives on the CPU")
    names = ["chat_image", "text_only_chat"]
    ins = [prompt_inputs(tiny_model, load_case(n)) for n in names]
    results = {}
    try:
        for backend in ("reference", "triton"):
            tiny_model.set_attention_backend(backend)
            runner = PagedRunner(tiny_model)
            first = runner.step(list(zip(names, ins, strict=True)))
            second = runner.step(
                [(n, decode_input(7, int(i["positions"][-1]) + 1)) for n, i in zip(names, ins, strict=True)]
            )
            results[backend] = torch.cat(first + second)
    finally:
        tiny_model.set_attention_backend("sdpa")
    torch.testing.assert_close(results["triton"], results["reference"], atol=2e-5, rtol=1e-4)
