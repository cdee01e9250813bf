"""Paged KV cache: block accounting (BlockManager) and the preallocated per-layer tensors.

Why paged: CogVLM2 prompts are either short (text, ~50 tokens) or long (one image = 2306
positions + text), and outputs vary from a few tokens to thousands. A slot-per-sequence cache
would reserve `max_model_len` (8192 tokens = 1 GiB in bf16 on the real model) for every
running sequence; fixed-size blocks (16 tokens by default) waste at most one partial block per
sequence, so the same memory holds several times more concurrent sequences. The block table
is handed to the model's attention through `AttentionMetadata`.

This module owns:
* `BlockManager`: a free pool of block ids, each request's block table (no tensors) and the
  prefix cache (content-hashed full prompt blocks shared between requests, e.g. every turn of
  a chat about one image reuses the image's K/V instead of recomputing 2306 positions);
* `num_kv_blocks_for(...)`: the cache size from the engine config (explicit blocks, explicit
  tokens, or a fraction of free GPU memory measured after the weights are loaded);
* `allocate_kv_caches(...)`: one `(k_cache, v_cache)` pair per decoder layer, each
  `[num_blocks, block_size, num_kv_heads, head_dim]`, on that layer's device and dtype (so
  accelerate-sharded models keep each layer's cache next to its weights).

It does not decide who runs (scheduler) nor write into the cache (the model does).
"""

from __future__ import annotations

import hashlib
import logging
import math
from array import array
from collections import OrderedDict

import torch

from cogvlm_ray.engine.config import DEFAULT_CPU_KV_TOKENS, EngineConfig

logger = logging.getLogger(__name__)


def prompt_block_hashes(
    token_ids: list[int], token_type_ids: list[int], image_hash: str | None, block_size: int
) -> list[bytes]:
    """Chained content hashes of the prompt's full blocks (the prefix-cache keys).

    Block i's key covers every token up to its end (the parent's key is hashed in), and a
    block holding vision positions also hashes the image content: the placeholder ids are the
    same for every image, the pixels are not.
    """
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.sha256(parent)
        digest.update(array("q", token_ids[start : start + block_size]).tobytes())
        if image_hash is not None and any(token_type_ids[start : start + block_size]):
            digest.update(image_hash.encode())
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class BlockManager:
    """Free-list allocator of KV blocks with reference counts and an optional prefix cache.

    Block tables are plain lists of ints per request. With prefix caching, a full prompt block
    whose K/V has been computed is registered under its `prompt_block_hashes` key; a later
    request with the same prefix (same image, same text so far) adopts those blocks instead of
    recomputing them (several running requests may share one block: full blocks are never
    written again). A cached block whose last user finished stays in the free pool with its
    contents and is evicted (forgotten) only when the pool hands it out again, least recently
    freed first, a request's tail blocks before its head.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._hash_of_block: dict[int, bytes] = {}
        self._block_of_hash: dict[bytes, int] = {}
        self._num_registered: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no running request holds (cached-but-unused blocks included)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_missing_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks still needed so that `request_id` can hold `num_tokens` tokens."""
        return max(0, self.blocks_for_tokens(num_tokens) - len(self.block_table(request_id)))

    def can_allocate(self, num_blocks: int, watermark: int = 0) -> bool:
        return len(self._free) - num_blocks >= watermark

    # ---- prefix cache -------------------------------------------------------------------
    def lookup_prefix(self, block_hashes: list[bytes]) -> list[int]:
        """Cached blocks for the longest prefix of `block_hashes` (empty without prefix caching)."""
        blocks: list[int] = []
        if self.enable_prefix_caching:
            for key in block_hashes:
                block = self._block_of_hash.get(key)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def num_blocks_to_take(self, request_id: str, num_tokens: int, prefix_blocks: list[int]) -> int:
        """Free-pool blocks an `allocate(request_id, num_tokens, prefix_blocks)` would consume."""
        reused_free = sum(1 for b in prefix_blocks if self._ref_counts[b] == 0)
        missing = self.blocks_for_tokens(num_tokens) - len(self.block_table(request_id)) - len(prefix_blocks)
        return max(0, missing) + reused_free

    def cache_blocks(self, request_id: str, block_hashes: list[bytes], num_computed_tokens: int) -> None:
        """Register the request's prompt blocks whose K/V is now fully computed."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request_id, [])
        num_full = min(len(block_hashes), num_computed_tokens // self.block_size, len(table))
        for i in range(self._num_registered.get(request_id, 0), num_full):
            block, key = table[i], block_hashes[i]
            if block not in self._hash_of_block and key not in self._block_of_hash:
                self._hash_of_block[block] = key
                self._block_of_hash[key] = block
        self._num_registered[request_id] = max(num_full, self._num_registered.get(request_id, 0))

    # ---- allocation ---------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, prefix_blocks: list[int] | None = None) -> list[int]:
        """Grow the request's table to hold `num_tokens` tokens; returns the whole table.

        `prefix_blocks` (from `lookup_prefix`, only for a request with no blocks yet) are
        adopted first. Raises RuntimeError when not enough blocks are free (callers check
        `can_allocate` with `num_blocks_to_take`).
        """
        prefix_blocks = prefix_blocks or []
        if len(self._free) < self.num_blocks_to_take(request_id, num_tokens, prefix_blocks):
            raise RuntimeError(f"KV cache exhausted: {len(self._free)} free blocks")
        table = self._tables.setdefault(request_id, [])
        if prefix_blocks:
            assert not table, "prefix blocks can only start a table"
            for block in prefix_blocks:
                if self._ref_counts[block] == 0:
                    del self._free[block]
                self._ref_counts[block] += 1
                table.append(block)
            self._num_registered[request_id] = len(prefix_blocks)
        for _ in range(self.blocks_for_tokens(num_tokens) - len(table)):
            block, _ = self._free.popitem(last=False)
            key = self._hash_of_block.pop(block, None)
            if key is not None:  # evict: its old contents are about to be overwritten
                del self._block_of_hash[key]
            self._ref_counts[block] = 1
            table.append(block)
        return table

    def free(self, request_id: str) -> int:
        """Release the request's blocks; returns how many it held. Cached blocks keep their contents."""
        table = self._tables.pop(request_id, [])
        self._num_registered.pop(request_id, None)
        for block in reversed(table):  # tail first, so it is evicted before the shared head
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
        return len(table)


def kv_bytes_per_block(
    layout: list[tuple[torch.device, torch.dtype]], block_size: int, num_kv_heads: int, head_dim: int
) -> dict[torch.device, int]:
    """Bytes one block costs on each device (K and V of every layer placed there)."""
    out: dict[torch.device, int] = {}
    for device, dtype in layout:
        per_layer = 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        out[torch.device(device)] = out.get(torch.device(device), 0) + per_layer
    return out


def num_kv_blocks_for(
    config: EngineConfig,
    layout: list[tuple[torch.device, torch.dtype]],
    num_kv_heads: int,
    head_dim: int,
    reserved_bytes: dict[torch.device, int] | None = None,
) -> int:
    """Cache size in blocks: explicit blocks > explicit tokens > GPU free-memory fraction > CPU default.

    On GPU the fraction applies to the memory free *after* the weights are loaded, per device,
    minus `reserved_bytes` there (the image-feature cache budget on the embedding device); the
    smallest device wins (every layer needs the same number of blocks). The remaining
    `1 - fraction` is headroom for activations, which the token budget bounds: a step touches at
    most `max_num_batched_tokens` prompt positions, so at most 2-3 real (2306-position) images
    go through the vision tower together.
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.max_kv_tokens is not None:
        return math.ceil(config.max_kv_tokens / config.block_size)
    per_device = kv_bytes_per_block(layout, config.block_size, num_kv_heads, head_dim)
    cuda_devices = [d for d in per_device if d.type == "cuda"]
    if not cuda_devices:
        return math.ceil(DEFAULT_CPU_KV_TOKENS / config.block_size)
    counts = []
    for device in cuda_devices:
        free_bytes, _total = torch.cuda.mem_get_info(device)
        budget = int(free_bytes * config.kv_cache_memory_fraction) - (reserved_bytes or {}).get(device, 0)
        counts.append(max(0, budget) // per_device[device])
        logger.info(
            "KV cache on %s: %.2f GiB free, %d bytes/block", device, free_bytes / 2**30, per_device[device]
        )
    num_blocks = min(counts)
    if num_blocks < 1:
        raise RuntimeError("no device memory left for the KV cache after loading the weights")
    return num_blocks


def allocate_kv_caches(
    layout: list[tuple[torch.device, torch.dtype]],
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One zeroed `(k_cache, v_cache)` per decoder layer, each [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for device, dtype in layout
    ]
