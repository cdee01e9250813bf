"""A decode step's `forward_flat` never syncs the host with the device, and its metadata is staged once.

The guard is a `TorchDispatchMode` around the runner's real `forward_flat` call. It records
every aten op that reads a device value back to the host (`_local_scalar_dense`: `.item()`,
`bool(t)`, `int(t)`; `nonzero`; `is_nonzero`; `item`), every tensor built from Python data
(`lift_fresh`: `torch.tensor(list)` inside the forward, a host-to-device copy on a GPU) and any
copy from a CPU tensor to another device. On CPU a "sync" costs nothing, but the same op on
CUDA blocks the host (and breaks graph capture), so the guard runs on CPU in the default suite.

On the code before this change (8fe9748) the sdpa test fails with 15 findings in its 3 decode
steps: per step `aten.is_nonzero` (the runner passed a device mask, so `ExpertRouting.from_mask`
ran `bool(mask.any())`), and per layer two `aten.lift_fresh` (the SDPA decode path built its
row indices with `torch.tensor(list)`). `test_the_guard_catches_the_mask_routing` keeps the
detection honest on today's code.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.engine import Engine, EngineConfig, SamplingParams
from cogvlm_ray.engine.config import resolve_attention_backend
from cogvlm_ray.engine.step_buffers import StepBuffers, stage_step
from cogvlm_ray.model import AttentionMetadata, load_model
from tests.triton_interpreter import kernel_device
from tests.unit.engine.fixture_prompts import load_case

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.item}
FROM_PYTHON_DATA = {aten.lift_fresh, aten.lift_fresh_copy}


class HostSyncGuard(TorchDispatchMode):
    """Records the ops (see the module docstring) that a sync-free forward must not run."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING or packet in FROM_PYTHON_DATA:
            self.violations.append(str(func))
        elif packet in (aten.copy_, aten._to_copy):
            src = args[1] if packet is aten.copy_ else args[0]
            dst_device = args[0].device if packet is aten.copy_ else kwargs.get("device")
            is_from_host = isinstance(src, torch.Tensor) and src.device.type == "cpu"
            if is_from_host and dst_device is not None and torch.device(dst_device).type != "cpu":
                self.violations.append(f"{func} cpu -> {dst_device}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


def _guarded_decode_steps(model, tokenizer, fixture_dir, backend: str) -> tuple[list[str], list[bool]]:
    """Run an image and a text request to completion; return the guard's findings in decode
    steps' forwards, and for each forward whether it was a decode-only step."""
    engine = Engine(
        model, tokenizer, EngineConfig(max_kv_tokens=512, block_size=4, attention_backend=backend)
    )
    violations: list[str] = []
    kinds: list[bool] = []
    original = model.forward_flat

    def guarded(*args, **kwargs):
        meta = kwargs["attn_metadata"] if "attn_metadata" in kwargs else args[4]
        is_decode = kwargs.get("image_embeds") is None and meta.max_query_len == 1
        kinds.append(is_decode)
        if not is_decode:
            return original(*args, **kwargs)
        guard = HostSyncGuard()
        with guard:
            out = original(*args, **kwargs)
        violations.extend(guard.violations)
        return out

    model.forward_flat = guarded
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0)

        async def main():
            streams = [
                engine.add_request(load_case(fixture_dir, name)[0], params, name)
                for name in ("chat_image", "text_only_chat")
            ]
            for stream in streams:
                async for _ in stream:
                    pass
            await engine.shutdown()

        asyncio.run(asyncio.wait_for(main(), 300))
    finally:
        del model.forward_flat  # back to the class method
    return violations, kinds


def test_sdpa_decode_forward_has_no_host_sync(model, tokenizer, fixture_dir) -> None:
    violations, kinds = _guarded_decode_steps(model, tokenizer, fixture_dir, "sdpa")
    assert kinds.count(True) >= 3, "decode steps were guarded"
    assert violations == []


def test_triton_decode_forward_has_no_host_sync(model, tokenizer, fixture_dir) -> None:
    with kernel_device() as device:
        if device.type != "cpu":
            pytest.skip("the module's model lives on the CPU")
        violations, kinds = _guarded_decode_steps(model, tokenizer, fixture_dir, "triton")
    assert kinds.count(True) >= 3
    assert violations == []


def test_the_guard_catches_the_mask_routing(model) -> None:
    """The forward as the runner used to call it (a device vision mask) syncs once per step."""
    k_cache = torch.zeros(8, 4, 2, 16)
    caches = [(k_cache.clone(), k_cache.clone()) for _ in model.model.layers]
    meta = AttentionMetadata.build([1, 1], [2, 5], [[1], [2, 3]], 4)
    guard = HostSyncGuard()
    with guard:
        model.forward_flat(
            torch.tensor([5, 6]), torch.tensor([2, 5]), torch.tensor([False, False]), caches, meta
        )
    assert "aten._local_scalar_dense.default" in guard.violations


def test_step_buffers_stage_a_step_in_place() -> None:
    """Host-built metadata equals `AttentionMetadata.build`, and views alias one persistent buffer."""
    buffers = StepBuffers(max_num_tokens=16, max_num_seqs=4, max_blocks_per_seq=4, device="cpu")
    address = buffers.device_buffer.data_ptr()
    tables = [[7], [2, 9, 4]]
    staged = stage_step(
        buffers,
        token_ids=[11, 12, 13, 14],
        positions=[0, 1, 2, 9],
        is_vision=[False, True, True, False],
        is_image=[False, True, False, False],
        query_lens=[3, 1],
        context_lens=[0, 9],
        block_tables=tables,
        sampled_seqs=[0, 1],
        block_size=4,
    )
    want = AttentionMetadata.build([3, 1], [0, 9], tables, 4)
    got = staged.attn_metadata
    for name in ("query_start_loc", "seq_lens", "slot_mapping"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name
    assert got.block_tables[0, :1].tolist() == [7] and got.block_tables[1].tolist() == [2, 9, 4]
    assert (got.max_query_len, got.max_seq_len) == (want.max_query_len, want.max_seq_len)
    assert staged.input_ids.tolist() == [11, 12, 13, 14] and staged.positions.tolist() == [0, 1, 2, 9]
    assert staged.expert_routing.vision_index.tolist() == [1, 2]
    assert staged.expert_routing.language_index.tolist() == [0, 3]
    assert staged.image_token_index.tolist() == [1]
    assert staged.sample_rows.tolist() == [2, 3]
    for tensor in (staged.input_ids, got.slot_mapping, got.block_tables, staged.sample_rows):
        assert buffers.device_buffer.data_ptr() <= tensor.data_ptr() < address + buffers.device_buffer.nbytes
    # A decode step: language-only routing has no tensors, no image index.
    decode = stage_step(
        buffers, token_ids=[5], positions=[10], is_vision=[False], is_image=[], query_lens=[1],
        context_lens=[10], block_tables=[[2, 9, 4]], sampled_seqs=[0], block_size=4,
    )  # fmt: skip
    assert decode.expert_routing.is_language_only and decode.image_token_index is None
    assert decode.attn_metadata.slot_mapping.tolist() == [4 * 4 + 2]
    assert buffers.device_buffer.data_ptr() == address


def test_padded_decode_batch_equals_the_unpadded_one() -> None:
    """The plumbing a graph runner needs: padding rows are inert for the Triton kernels."""
    with kernel_device() as device:
        from cogvlm_ray.model.attention import ATTENTION_BACKENDS

        backend = ATTENTION_BACKENDS["triton"]
        gen = torch.Generator().manual_seed(0)
        k_cache = torch.randn(12, 4, 2, 16, generator=gen).to(device)
        v_cache = torch.randn(12, 4, 2, 16, generator=gen).to(device)
        key, value = torch.randn(2, 2, 2, 16, generator=gen).to(device)
        query = torch.randn(2, 4, 16, generator=gen).to(device)
        results = []
        for padded in (2, 4):
            buffers = StepBuffers(max_num_tokens=8, max_num_seqs=8, max_blocks_per_seq=4, device=device)
            staged = stage_step(
                buffers, token_ids=[3, 4], positions=[5, 9], is_vision=[False] * 2, is_image=[],
                query_lens=[1, 1], context_lens=[5, 9], block_tables=[[3, 8], [1, 6, 10]],
                sampled_seqs=[0, 1], block_size=4,
            )  # fmt: skip
            buffers.pad_decode_batch(2, padded)
            buffers.copy_to_device()
            meta = dataclasses.replace(
                staged.attn_metadata,
                query_start_loc=buffers.device_section("query_start_loc", padded + 1),
                seq_lens=buffers.device_section("seq_lens", padded),
                slot_mapping=buffers.device_section("slot_mapping", padded),
                block_tables=buffers.device_section("block_tables", padded),
                _step_cache={},
            )
            pad = padded - 2
            k_c, v_c = k_cache.clone(), v_cache.clone()
            backend.write_kv(
                torch.cat([key, key.new_ones(pad, 2, 16)]), torch.cat([value, value.new_ones(pad, 2, 16)]),
                k_c, v_c, meta.slot_mapping,
            )  # fmt: skip
            out = backend.attend(torch.cat([query, query.new_ones(pad, 4, 16)]), k_c, v_c, meta, 0.25)
            results.append((out[:2], k_c, v_c, out[2:]))
    (out2, k2, v2, _), (out4, k4, v4, pad_rows) = results
    assert torch.equal(out2, out4) and torch.equal(k2, k4) and torch.equal(v2, v4)
    assert torch.equal(pad_rows, torch.zeros_like(pad_rows))


def test_attention_backend_config() -> None:
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash").validate()
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    assert resolve_attention_backend("reference", "cpu") == "reference"
    with kernel_device() as device:
        assert resolve_attention_backend("triton", device.type) == "triton"
        if device.type == "cuda":
            assert resolve_attention_backend("auto", "cuda") == "triton"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_attention_backend("triton", "cpu")  # outside the interpreter, CPU cannot run it
