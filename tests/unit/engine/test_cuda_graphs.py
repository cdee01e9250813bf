"""The decode graph path (engine/cuda_graphs.py): buckets, padding, the scratch block, the engine.

On CPU the padded static-buffer path runs without capture, through the same code that a
captured graph replays on CUDA. The GPU test (auto-skipped) checks replay == eager per bucket.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import cogvlm_ray.engine.engine as engine_module
from cogvlm_ray.engine import Engine, EngineConfig, SamplingParams
from cogvlm_ray.engine.cuda_graphs import (
    DecodeGraphRunner,
    bucket_for,
    cuda_graphs_unavailable,
    decode_buckets,
)
from cogvlm_ray.engine.kv_cache import allocate_kv_caches
from cogvlm_ray.model import load_model
from cogvlm_ray.model.attention import ATTENTION_BACKENDS, AttentionMetadata
from cogvlm_ray.model.language import ExpertRouting
from tests.unit.engine.fixture_prompts import CASES, load_case

BLOCK_SIZE = 4
MAX_SEQS = 8
MAX_BLOCKS = 16  # per sequence: contexts up to 64 tokens
SCRATCH = MAX_SEQS * MAX_BLOCKS  # the block after every sequence's blocks


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir, dtype=torch.float32)


def test_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(3) == [1, 2, 3]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert decode_buckets(64)[-4:] == [40, 48, 56, 64]
    buckets = decode_buckets(32)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 17, 25, 32)] == [1, 2, 4, 8, 8, 16, 24, 32, 32]
    assert bucket_for(33, buckets) is None
    with pytest.raises(ValueError):
        decode_buckets(0)


def test_graphs_need_cuda_one_device_and_a_graph_safe_backend():
    cuda = {torch.device("cuda:0")}
    assert cuda_graphs_unavailable(False, cuda, "triton") is None
    assert "enforce_eager" in cuda_graphs_unavailable(True, cuda, "triton")
    assert "CUDA" in cuda_graphs_unavailable(False, {torch.device("cpu")}, "triton")
    assert "2 devices" in cuda_graphs_unavailable(
        False, {torch.device("cuda:0"), torch.device("cuda:1")}, "triton"
    )
    assert "sdpa" in cuda_graphs_unavailable(False, cuda, "sdpa")


def _caches(model, device="cpu"):
    config = model.model_config
    layout = [(torch.device(device), dtype) for _, dtype in model.kv_cache_layout()]
    return allocate_kv_caches(layout, SCRATCH + 1, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)


def _prefilled(model, num_seqs: int, seed: int = 0, device="cpu"):
    """Caches holding `num_seqs` text sequences of different lengths; (caches, contexts, tables, next ids)."""
    gen = torch.Generator().manual_seed(seed)
    caches = _caches(model, device)
    contexts, tables, next_ids = [], [], []
    for b in range(num_seqs):
        length = 3 + 5 * b % 37  # not block multiples, up to 39 tokens
        table = list(range(b * MAX_BLOCKS, (b + 1) * MAX_BLOCKS))
        ids = torch.randint(0, 500, (length,), generator=gen)
        model.forward_flat(
            ids.to(device),
            torch.arange(length, device=device),
            None,
            caches,
            AttentionMetadata.build([length], [0], [table], BLOCK_SIZE, device=device),
            expert_routing=ExpertRouting(None, None),
        )
        contexts.append(length)
        tables.append(table)
        next_ids.append(int(torch.randint(0, 500, (1,), generator=gen)))
    return caches, contexts, tables, next_ids


def _eager_decode(model, caches, ids, contexts, tables):
    """The unpadded eager forward of one decode step (what the engine ran before graphs)."""
    n = len(ids)
    return model.forward_flat(
        torch.tensor(ids),
        torch.tensor(contexts),
        torch.zeros(n, dtype=torch.bool),
        caches,
        AttentionMetadata.build([1] * n, contexts, tables, BLOCK_SIZE),
    )


def _runner(model, caches, capture=False, graph_safe=False):
    return DecodeGraphRunner(
        model, caches, block_size=BLOCK_SIZE, max_num_seqs=MAX_SEQS, max_blocks_per_seq=MAX_BLOCKS,
        scratch_block=SCRATCH, capture=capture, graph_safe=graph_safe,
    )  # fmt: skip


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 4, 5, 7, 8])
def test_padded_decode_equals_unpadded_and_touches_only_its_slots_and_the_scratch_block(model, num_seqs):
    caches, contexts, tables, ids = _prefilled(model, MAX_SEQS)
    ids, contexts, tables = ids[:num_seqs], contexts[:num_seqs], tables[:num_seqs]
    eager_caches = [(k.clone(), v.clone()) for k, v in caches]
    before = [(k.clone(), v.clone()) for k, v in caches]

    expected = _eager_decode(model, eager_caches, ids, contexts, tables)
    runner = _runner(model, caches)
    padded = runner.run(ids, contexts, contexts, tables)  # decode positions = context lengths here

    assert padded.shape == expected.shape
    # Same math on the real rows; the row count of the GEMMs differs (bucket vs batch), and MKL's
    # kernels for different M may round the last bit differently, so this is a tolerance check.
    # The bit-exact checks are below (same bucket, different company) and in the engine test.
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        model.compute_logits(padded), model.compute_logits(expected), rtol=1e-5, atol=1e-5
    )

    real_slots = {
        t[c // BLOCK_SIZE] * BLOCK_SIZE + c % BLOCK_SIZE for t, c in zip(tables, contexts, strict=True)
    }
    padded_rows = bucket_for(num_seqs, runner.buckets) > num_seqs
    allowed = real_slots | ({SCRATCH * BLOCK_SIZE} if padded_rows else set())
    for (k0, v0), (k1, v1), (ke, ve) in zip(before, caches, eager_caches, strict=True):
        for old, new in ((k0, k1), (v0, v1)):
            changed = (old.flatten(0, 1) != new.flatten(0, 1)).flatten(1).any(1).nonzero().flatten().tolist()
            assert set(changed) <= allowed
            assert real_slots <= set(changed)
        # real sequences' blocks after the padded step == after the unpadded one (up to GEMM rounding)
        torch.testing.assert_close(k1[:SCRATCH], ke[:SCRATCH], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1[:SCRATCH], ve[:SCRATCH], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_seqs", [3, 5, 7])
def test_padding_rows_do_not_leak_into_real_rows_bit_exact(model, num_seqs):
    """Padded to 4 / 8: the real rows are bit-identical to a full bucket of real sequences.

    With the reference attention (one softmax per sequence over its own keys); the SDPA decode
    sizes its key gather by the step's longest sequence, which the company changes."""
    model.set_attention_backend("reference")
    try:
        _check_no_leak(model, num_seqs)
    finally:
        model.set_attention_backend("sdpa")


def _check_no_leak(model, num_seqs):
    caches, contexts, tables, ids = _prefilled(model, MAX_SEQS)
    bucket = bucket_for(num_seqs, decode_buckets(MAX_SEQS))
    full_caches = [(k.clone(), v.clone()) for k, v in caches]
    padded = _runner(model, caches).run(
        ids[:num_seqs], contexts[:num_seqs], contexts[:num_seqs], tables[:num_seqs]
    )
    full = _runner(model, full_caches).run(
        ids[:bucket], contexts[:bucket], contexts[:bucket], tables[:bucket]
    )
    assert torch.equal(padded, full[:num_seqs])
    for (k, v), (kf, vf) in zip(caches, full_caches, strict=True):
        for b in range(num_seqs):  # each real sequence's blocks hold exactly the same K/V
            blocks = tables[b]
            assert torch.equal(k[blocks], kf[blocks]) and torch.equal(v[blocks], vf[blocks])


def test_scratch_block_is_never_handed_out_and_batches_too_large_are_refused(model, fixture_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))
    engine = Engine(model, tokenizer, EngineConfig(num_kv_blocks=10, block_size=4))
    assert engine.runner.kv_caches[0][0].shape[0] == 11  # 10 for requests + the scratch block
    tables = [engine.block_manager.allocate(f"r{i}", 4) for i in range(10)]
    assert sorted(b for t in tables for b in t) == list(range(10))
    runner = _runner(model, _caches(model))
    assert runner.fits(MAX_SEQS, [[0] * MAX_BLOCKS])
    assert not runner.fits(MAX_SEQS + 1, [[0]] * (MAX_SEQS + 1))
    assert not runner.fits(1, [[0] * (MAX_BLOCKS + 1)])
    with pytest.raises(ValueError):
        runner.run([1] * (MAX_SEQS + 1), [1] * (MAX_SEQS + 1), [1] * (MAX_SEQS + 1), [[0]] * (MAX_SEQS + 1))


def test_capture_needs_a_graph_safe_backend(model):
    with pytest.raises(ValueError, match="graph-safe"):
        _runner(model, _caches(model), capture=True, graph_safe=False).capture()


@pytest.mark.skipif("triton" not in ATTENTION_BACKENDS, reason="needs the triton attention backend")
def test_the_captured_forward_with_triton_equals_the_unpadded_decode(fixture_dir):
    """What a capture records (triton kernels, full-width block tables, host lengths claiming the
    full width, scratch-block padding) run without capture: Triton's interpreter on CPU."""
    from tests.triton_interpreter import kernel_device

    with kernel_device() as device:
        cpu = device.type == "cpu"
        model = load_model(fixture_dir, dtype=torch.float32, device_map=None if cpu else str(device))
        model.set_attention_backend("triton")
        caches, contexts, tables, ids = _prefilled(model, MAX_SEQS, device=str(device))
        for num_seqs in (3, 8):
            eager_caches = [(k.clone(), v.clone()) for k, v in caches]
            args = (ids[:num_seqs], contexts[:num_seqs], contexts[:num_seqs], tables[:num_seqs])
            padded = _runner(model, caches, graph_safe=True).run(*args)
            meta = AttentionMetadata.build(
                [1] * num_seqs, contexts[:num_seqs], tables[:num_seqs], BLOCK_SIZE, device=device
            )
            expected = model.forward_flat(
                torch.tensor(ids[:num_seqs], device=device), torch.tensor(contexts[:num_seqs], device=device),
                None, eager_caches, meta, expert_routing=ExpertRouting(None, None),
            )  # fmt: skip
            torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-5)
            for (k, v), (ke, ve) in zip(caches, eager_caches, strict=True):
                torch.testing.assert_close(k[:SCRATCH], ke[:SCRATCH], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(v[:SCRATCH], ve[:SCRATCH], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_the_padded_decode_forward_never_syncs_the_host(model, backend):
    """What a graph holds must not read the device back (capture would fail on CUDA): the
    sync-free step's `HostSyncGuard` around the padded forward, at every bucket."""
    guard_module = pytest.importorskip("tests.unit.engine.test_sync_free_decode")
    if backend not in ATTENTION_BACKENDS:
        pytest.skip(f"no {backend} attention backend")
    from contextlib import nullcontext

    from tests.triton_interpreter import kernel_device

    with kernel_device() if backend == "triton" else nullcontext(torch.device("cpu")) as device:
        if device.type != "cpu":
            pytest.skip("the CPU model fixture")
        model.set_attention_backend(backend)
        try:
            caches, contexts, tables, ids = _prefilled(model, MAX_SEQS)
            runner = _runner(model, caches, graph_safe=backend == "triton")
            for bucket in runner.buckets:
                runner.buffers.stage(
                    ids[:bucket], contexts[:bucket], contexts[:bucket], tables[:bucket], bucket
                )
                with guard_module.HostSyncGuard() as guard:
                    runner._forward(bucket, host_lens=backend != "triton")
                assert guard.violations == [], (bucket, guard.violations)
        finally:
            model.set_attention_backend("sdpa")


def test_engine_with_the_graph_path_forced_on_gives_the_golden_tokens(model, fixture_dir, monkeypatch):
    """Padded decode steps (no capture) through the whole engine: batches shrink 5 -> 1 as requests end."""
    monkeypatch.setattr(engine_module, "decode_graph_mode", lambda *args: "padded")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))
    cases = {name: load_case(fixture_dir, name) for name in CASES}
    max_tokens = dict(zip(CASES, (12, 3, 7, 12, 5), strict=True))
    batch_sizes: list[int] = []

    async def main():
        engine = Engine(
            model,
            tokenizer,
            EngineConfig(max_kv_tokens=2048, block_size=4, max_num_seqs=8, max_images_per_step=3),
        )  # all five prefill in step 1, so every later step is decode-only
        graphs = engine.runner.decode_graphs
        assert graphs is not None and not graphs.capture_enabled and not engine.use_cuda_graphs
        run = graphs.run

        def counting(token_ids, *args):
            batch_sizes.append(len(token_ids))
            return run(token_ids, *args)

        graphs.run = counting
        streams = [
            engine.add_request(
                cases[name][0], SamplingParams(max_tokens=max_tokens[name], temperature=0.0), name
            )
            for name in CASES
        ]
        outputs = await asyncio.gather(*(_collect(s) for s in streams))
        await engine.shutdown()
        return outputs

    outputs = asyncio.run(asyncio.wait_for(main(), timeout=120))
    for name, ids in zip(CASES, outputs, strict=True):
        assert ids == cases[name][1][: max_tokens[name]], name
    assert {5, 3, 2} <= set(batch_sizes)  # padded to 8, 4 and 2 rows
    assert sum(batch_sizes) == sum(m - 1 for m in max_tokens.values())  # every decode step went through it


async def _collect(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


def test_enforce_eager_and_cpu_leave_graphs_off(model, fixture_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))
    for config in (EngineConfig(max_kv_tokens=256), EngineConfig(max_kv_tokens=256, enforce_eager=True)):
        engine = Engine(model, tokenizer, config)
        assert engine.runner.decode_graphs is None and engine.use_cuda_graphs is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif("triton" not in ATTENTION_BACKENDS, reason="needs the triton attention backend")
def test_graph_replay_equals_eager_bit_for_bit_at_each_bucket():
    from cogvlm_ray.model.random_init import build_random_model
    from cogvlm_ray.model.tiny import tiny_config

    model = build_random_model(tiny_config("tiny"), torch.device("cuda"), torch.bfloat16, seed=0)
    model.set_attention_backend("triton")
    caches, contexts, tables, ids = _prefilled(model, MAX_SEQS, device="cuda")
    eager_caches = [(k.clone(), v.clone()) for k, v in caches]
    graphs = _runner(model, caches, capture=True, graph_safe=True)
    eager = _runner(model, eager_caches, capture=False, graph_safe=True)  # the same metadata, not captured
    graphs.capture()
    assert graphs.num_graphs == len(graphs.buckets)
    for num_seqs in (1, 2, 3, 4, 5, 8):
        args = (ids[:num_seqs], contexts[:num_seqs], contexts[:num_seqs], tables[:num_seqs])
        replayed, expected = graphs.run(*args).clone(), eager.run(*args).clone()
        assert torch.equal(replayed, expected), num_seqs
        for (k, v), (ke, ve) in zip(caches, eager_caches, strict=True):
            assert torch.equal(k[:SCRATCH], ke[:SCRATCH]) and torch.equal(v[:SCRATCH], ve[:SCRATCH])
