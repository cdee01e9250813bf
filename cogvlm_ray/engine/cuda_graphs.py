"""CUDA graphs for decode steps: static buffers, batch-size buckets, padding, capture and replay.

A runner concern, not a model one: the model only promises a `forward_flat` that reads nothing
back from the device when it is given host-built expert routing. `DecodeGraphRunner` owns

* `DecodeBuffers`: the step inputs at fixed device addresses (token ids, positions, slot
  mapping, sequence lengths, query starts, block tables; one int64 buffer, pinned on the host
  side, so a step costs ONE host-to-device copy) and the output hidden states;
* the buckets: batch sizes 1, 2, 4, 8, 16, 24, 32, ... up to `max_num_seqs`
  (`decode_buckets`); a batch of B runs as the smallest bucket >= B;
* padding: rows B..bucket-1 get token 0 at position 0, KV length 1, and a block table whose
  only block is the engine's reserved *scratch block*, so their K/V writes land there and never
  in a real sequence's cache; their outputs are dropped;
* capture (CUDA only, at engine start after the KV cache is allocated, largest bucket first,
  one memory pool) and replay. Without capture (`capture=False`) the SAME buffers, padding and
  forward run eagerly, which is how the CPU tests exercise this path.

Mixed steps (any prefill chunk) never come here; the runner runs them eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from cogvlm_ray.model.attention import AttentionMetadata
from cogvlm_ray.model.language import ExpertRouting

logger = logging.getLogger(__name__)

#: Attention backends whose decode depends on tensor shapes only (not on host lengths), so a
#: captured graph stays valid for any context length. The SDPA decode sizes its key gather by
#: the step's longest sequence (a host int); the reference backend loops over host lengths.
GRAPH_SAFE_BACKENDS = frozenset({"triton"})

_SECTIONS = ("input_ids", "positions", "slot_mapping", "seq_lens", "query_start_loc", "block_tables")


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then every multiple of 8, up to and including `max_num_seqs`."""
    if max_num_seqs < 1:
        raise ValueError("max_num_seqs must be >= 1")
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


def bucket_for(num_seqs: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `num_seqs` rows (None when the batch is too large)."""
    for bucket in buckets:
        if bucket >= num_seqs:
            return bucket
    return None


def cuda_graphs_unavailable(
    enforce_eager: bool, devices: set[torch.device], attention_backend: str
) -> str | None:
    """Why decode steps cannot be captured here, or None when they can (`use_cuda_graphs`)."""
    if enforce_eager:
        return "enforce_eager is set"
    if any(d.type != "cuda" for d in devices):
        return "the model is not on CUDA"
    if len(devices) != 1:
        return f"the model spans {len(devices)} devices"
    if attention_backend not in GRAPH_SAFE_BACKENDS:
        return f"the {attention_backend!r} attention backend sizes its decode by host lengths"
    return None


class DecodeBuffers:
    """A decode step's inputs at fixed addresses, sized for `max_num_seqs` rows.

    One int64 host tensor (pinned on CUDA) carved into sections, and its device twin (the same
    tensor on CPU: no copy). `stage` writes the host sections with numpy and issues one copy;
    `views(bucket)` are the device tensors the forward (and a captured graph) reads.
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.device = torch.device(device)
        sizes = dict.fromkeys(_SECTIONS[:4], max_num_seqs)
        sizes["query_start_loc"] = max_num_seqs + 1
        sizes["block_tables"] = max_num_seqs * max_blocks_per_seq
        self._offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name in _SECTIONS:
            self._offsets[name] = (total, total + sizes[name])
            total += sizes[name]
        on_cpu = self.device.type == "cpu"
        self.host = torch.zeros(total, dtype=torch.int64, pin_memory=not on_cpu)
        self.device_buffer = self.host if on_cpu else torch.zeros(total, dtype=torch.int64, device=device)
        self._host_np = self.host.numpy()
        self._query_starts = np.arange(max_num_seqs + 1)
        self._host_seq_lens: list[int] = []

    def _host(self, name: str) -> np.ndarray:
        start, end = self._offsets[name]
        view = self._host_np[start:end]
        return view.reshape(self.max_num_seqs, -1) if name == "block_tables" else view

    def _device(self, name: str) -> torch.Tensor:
        start, end = self._offsets[name]
        view = self.device_buffer[start:end]
        return view.view(self.max_num_seqs, -1) if name == "block_tables" else view

    def stage(
        self,
        token_ids: list[int],
        positions: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        bucket: int,
    ) -> None:
        """Write B decode rows (one new token each, after `context_lens[b]` cached ones), pad to `bucket`.

        Padding rows: token 0, position 0, KV length 1, their one K/V slot and their only block
        the scratch block. Then the one host-to-device copy.
        """
        num_seqs = len(token_ids)
        if not num_seqs <= bucket <= self.max_num_seqs:
            raise ValueError(f"cannot stage {num_seqs} rows into a bucket of {bucket}")
        block_size = self.block_size
        ids, pos = self._host("input_ids"), self._host("positions")
        slots, lens, tables = self._host("slot_mapping"), self._host("seq_lens"), self._host("block_tables")
        ids[:num_seqs] = token_ids
        pos[:num_seqs] = positions
        for b, (context, table) in enumerate(zip(context_lens, block_tables, strict=True)):
            if len(table) > self.max_blocks_per_seq or len(table) * block_size <= context:
                raise ValueError(f"block table of {len(table)} blocks does not fit a decode at {context}")
            tables[b, : len(table)] = table
            slots[b] = table[context // block_size] * block_size + context % block_size
        lens[:num_seqs] = np.asarray(context_lens) + 1
        rows = slice(num_seqs, bucket)
        ids[rows] = 0
        pos[rows] = 0
        lens[rows] = 1
        slots[rows] = self.scratch_block * block_size
        tables[rows, 0] = self.scratch_block
        self._host("query_start_loc")[:] = self._query_starts
        self._host_seq_lens = [c + 1 for c in context_lens] + [1] * (bucket - num_seqs)
        if self.device_buffer is not self.host:
            self.device_buffer.copy_(self.host, non_blocking=True)

    def views(self, bucket: int, *, host_lens: bool) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions) `[bucket]` and the `AttentionMetadata` over the full table width.

        `host_lens`: give the metadata the staged per-row lengths (eager runs, any backend);
        without it the host lengths claim the full width, which only graph-safe backends accept.
        """
        block_size = self.block_size
        width = self.max_blocks_per_seq * block_size
        seq_lens_cpu = list(self._host_seq_lens) if host_lens else [width] * bucket
        meta = AttentionMetadata(
            query_start_loc=self._device("query_start_loc")[: bucket + 1],
            seq_lens=self._device("seq_lens")[:bucket],
            slot_mapping=self._device("slot_mapping")[:bucket],
            block_tables=self._device("block_tables")[:bucket],
            block_size=block_size,
            max_query_len=1,
            max_seq_len=max(seq_lens_cpu, default=0),
            query_lens_cpu=[1] * bucket,
            seq_lens_cpu=seq_lens_cpu,
        )
        return self._device("input_ids")[:bucket], self._device("positions")[:bucket], meta


class DecodeGraphRunner:
    """Runs decode-only steps padded to a bucket: replays a captured graph, or the same forward eagerly.

    `model` is the engine's `CogVLM2ForCausalLM` (single device); `kv_caches` include the
    scratch block `scratch_block` that no request is ever given. `graph_safe`: the model's
    attention backend is in `GRAPH_SAFE_BACKENDS` (required for `capture`).
    """

    def __init__(
        self,
        model: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        capture: bool,
        graph_safe: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = decode_buckets(max_num_seqs)
        self.capture_enabled = capture
        # With a graph-safe backend the eager padded run gets the very metadata a capture
        # records (host lengths at full width), so CPU tests exercise the captured forward.
        self._eager_host_lens = not graph_safe
        device = model.embed_device
        self.buffers = DecodeBuffers(max_num_seqs, max_blocks_per_seq, block_size, scratch_block, device)
        self.hidden = torch.zeros(
            max_num_seqs, model.model_config.hidden_size, dtype=model.model_dtype, device=device
        )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._language_only = ExpertRouting(language_index=None, vision_index=None)

    @property
    def max_blocks_per_seq(self) -> int:
        return self.buffers.max_blocks_per_seq

    def fits(self, num_seqs: int, block_tables: list[list[int]]) -> bool:
        """Whether a decode batch can run here (else the runner runs it eagerly, unpadded)."""
        width = self.buffers.max_blocks_per_seq
        return num_seqs <= self.buckets[-1] and all(len(t) <= width for t in block_tables)

    def _forward(self, bucket: int, *, host_lens: bool) -> torch.Tensor:
        input_ids, positions, meta = self.buffers.views(bucket, host_lens=host_lens)
        hidden = self.model.forward_flat(
            input_ids,
            positions,
            None,
            self.kv_caches,
            meta,
            expert_routing=self._language_only,
        )
        out = self.hidden[:bucket]
        out.copy_(hidden)
        return out

    @torch.inference_mode()
    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Hidden states `[B, H]` of B decode rows (row b: `token_ids[b]` at `positions[b]`, after
        `context_lens[b]` cached tokens in `block_tables[b]`); padded rows are computed and dropped."""
        bucket = bucket_for(len(token_ids), self.buckets)
        if bucket is None:
            raise ValueError(
                f"decode batch of {len(token_ids)} exceeds the largest bucket {self.buckets[-1]}"
            )
        self.buffers.stage(token_ids, positions, context_lens, block_tables, bucket)
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph.replay()
            return self.hidden[: len(token_ids)]
        return self._forward(bucket, host_lens=self._eager_host_lens)[: len(token_ids)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket (largest first, one pool); a no-op unless capture is enabled.

        Each capture is preceded by one eager warm-up of the same bucket (kernel compilation,
        library workspaces). All rows are padding then: only the scratch block is written.
        """
        if not self.capture_enabled or self._graphs:
            return
        if self._eager_host_lens:
            raise ValueError("CUDA graphs need a graph-safe attention backend (GRAPH_SAFE_BACKENDS)")
        device = self.hidden.device
        torch.cuda.synchronize(device)
        free_before, _ = torch.cuda.mem_get_info(device)
        started = time.perf_counter()
        pool = None
        for bucket in reversed(self.buckets):
            self.buffers.stage([], [], [], [], bucket)
            self._forward(bucket, host_lens=False)  # warm-up, eager
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bucket, host_lens=False)
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize(device)
        free_after, _ = torch.cuda.mem_get_info(device)
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.2f s, using %.1f MiB of device memory",
            len(self._graphs),
            self.buckets,
            time.perf_counter() - started,
            (free_before - free_after) / 2**20,
        )

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
