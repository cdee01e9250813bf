"""Paged KV block accounting, cache sizing/allocation, and the image-feature LRU."""

from __future__ import annotations

import pytest
import torch

from cogvlm_ray.engine.config import DEFAULT_CPU_KV_TOKENS, EngineConfig
from cogvlm_ray.engine.image_cache import ImageFeatureCache
from cogvlm_ray.engine.kv_cache import (
    BlockManager,
    allocate_kv_caches,
    kv_bytes_per_block,
    num_kv_blocks_for,
    prompt_block_hashes,
)


def test_block_manager_allocate_grow_free():
    bm = BlockManager(num_blocks=6, block_size=4)
    table = bm.allocate("a", 5)
    assert len(table) == 2 and bm.num_free_blocks == 4
    assert bm.num_missing_blocks("a", 8) == 0 and bm.num_missing_blocks("a", 9) == 1
    assert bm.allocate("a", 9) == table and len(table) == 3
    bm.allocate("b", 12)
    assert bm.usage == 1.0 and not bm.can_allocate(1)
    assert len(set(bm.block_table("a")) | set(bm.block_table("b"))) == 6, "no block is shared"
    with pytest.raises(RuntimeError):
        bm.allocate("c", 1)
    assert bm.free("a") == 3 and bm.num_free_blocks == 3 and bm.free("a") == 0
    assert bm.can_allocate(2, watermark=1) and not bm.can_allocate(3, watermark=1)


def test_kv_size_from_config():
    layout = [(torch.device("cpu"), torch.float32)] * 2
    assert num_kv_blocks_for(EngineConfig(num_kv_blocks=7), layout, 2, 16) == 7
    assert num_kv_blocks_for(EngineConfig(max_kv_tokens=100, block_size=16), layout, 2, 16) == 7
    assert num_kv_blocks_for(EngineConfig(), layout, 2, 16) == DEFAULT_CPU_KV_TOKENS // 16
    # K and V, 2 layers, 16 tokens, 2 heads, dim 16, 4 bytes.
    assert kv_bytes_per_block(layout, 16, 2, 16) == {torch.device("cpu"): 2 * 2 * 16 * 2 * 16 * 4}


def test_caches_follow_each_layers_device_and_dtype():
    layout = [(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.bfloat16)]
    caches = allocate_kv_caches(layout, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=8)
    assert [k.dtype for k, _ in caches] == [torch.float32, torch.bfloat16]
    assert all(k.shape == v.shape == (3, 4, 2, 8) for k, v in caches)


def test_engine_config_validation():
    with pytest.raises(ValueError):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32).validate()
    with pytest.raises(ValueError):
        EngineConfig(kv_cache_memory_fraction=0).validate()
    EngineConfig().validate()


def test_image_cache_lru_under_byte_budget():
    item = torch.zeros(10, 4)  # 160 bytes
    cache = ImageFeatureCache(max_bytes=400)
    cache.put("a", item)
    cache.put("b", item.clone())
    assert cache.get("a") is item, "a hit returns the stored tensor itself"
    cache.put("c", item.clone())  # evicts the least recently used: b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.num_bytes == 320 and len(cache) == 2
    assert cache.get("b") is None
    assert (cache.num_hits, cache.num_queries) == (1, 2)
    cache.put("huge", torch.zeros(200))  # 800 bytes > budget: not stored, nothing evicted
    assert "huge" not in cache and len(cache) == 2
    disabled = ImageFeatureCache(max_bytes=0)
    disabled.put("a", item)
    assert disabled.get("a") is None


def test_prompt_block_hashes_chain_and_include_the_image():
    ids, types = list(range(10)), [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    base = prompt_block_hashes(ids, types, "img-a", block_size=4)
    assert len(base) == 2, "only full blocks are keyed"
    assert prompt_block_hashes(ids, types, "img-a", 4) == base
    other_image = prompt_block_hashes(ids, types, "img-b", 4)
    assert other_image[0] != base[0] and other_image[1] != base[1]
    text_ids = list(range(12))
    changed_first = prompt_block_hashes([99] + text_ids[1:], [0] * 12, None, 4)
    plain = prompt_block_hashes(text_ids, [0] * 12, None, 4)
    assert all(a != b for a, b in zip(changed_first, plain, strict=True)), (
        "a block's key covers its whole prefix"
    )


def test_prefix_blocks_are_shared_then_kept_then_evicted_tail_first():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    hashes = prompt_block_hashes(list(range(12)), [0] * 12, None, 4)
    first = list(bm.allocate("a", 12))
    assert bm.lookup_prefix(hashes) == [], "nothing is cached before its K/V is computed"
    bm.cache_blocks("a", hashes, num_computed_tokens=12)
    assert bm.lookup_prefix(hashes) == first
    prefix = bm.lookup_prefix(hashes)[:2]
    assert bm.num_blocks_to_take("b", 12, prefix) == 1
    assert bm.allocate("b", 12, prefix)[:2] == first[:2]
    assert bm.num_free_blocks == 2, "two shared blocks count once"
    bm.free("a")
    assert bm.num_free_blocks == 3 and bm.lookup_prefix(hashes)[:2] == first[:2], "b still holds the head"
    bm.free("b")
    assert bm.num_free_blocks == 6 and bm.lookup_prefix(hashes) == first, "freed blocks stay cached"
    assert bm.num_blocks_to_take("c", 12, first) == 3, "reusing free cached blocks takes them from the pool"
    bm.allocate("d", 12)  # never-used blocks first (2 of them), then the oldest freed: a's tail
    assert bm.lookup_prefix(hashes) == first[:2] and bm.num_cached_blocks == 2
    bm.allocate("e", 4)  # b's own (uncached) tail block
    assert bm.lookup_prefix(hashes) == first[:2]
    bm.allocate("f", 4)  # then the shared head, its second block before its first
    assert bm.lookup_prefix(hashes) == first[:1] and bm.num_cached_blocks == 1
    disabled = BlockManager(num_blocks=4, block_size=4)
    disabled.allocate("a", 8)
    disabled.cache_blocks("a", hashes, 8)
    assert disabled.lookup_prefix(hashes) == []


def test_gpu_sizing_uses_free_memory_after_weights_minus_the_image_cache(monkeypatch):
    gib = 1 << 30
    free = {torch.device("cuda:0"): 10 * gib, torch.device("cuda:1"): 4 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[torch.device(device)], 80 * gib))
    # Two layers per device, bf16, 8 KV heads x 128: 2 * 16 * 8 * 128 * 2 B = 64 KiB per layer per block.
    layout = [(torch.device("cuda:0"), torch.bfloat16)] * 2 + [(torch.device("cuda:1"), torch.bfloat16)] * 2
    per_block = 2 * 65536
    config = EngineConfig(kv_cache_memory_fraction=0.5, image_cache_bytes=gib)
    blocks = num_kv_blocks_for(config, layout, 8, 128, reserved_bytes={torch.device("cuda:0"): gib})
    # cuda:0: 5 GiB - 1 GiB reserved; cuda:1: 2 GiB -> the smaller device decides.
    assert blocks == (2 * gib) // per_block
    free[torch.device("cuda:1")] = 20 * gib
    blocks = num_kv_blocks_for(config, layout, 8, 128, reserved_bytes={torch.device("cuda:0"): gib})
    assert blocks == (4 * gib) // per_block
