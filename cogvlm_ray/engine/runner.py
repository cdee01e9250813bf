"""ModelRunner: the only engine code that builds tensors and calls the model.

It never decides who runs. Given a `SchedulerOutput` it
1. finds the image features the step needs (image-feature cache first; the misses of the step,
   deduplicated by hash, go through the vision tower as one batch);
2. builds the flat batch: token ids, rotary positions, vision-expert mask, image-token mask and
   the image rows for the prefill chunks, one token per decode (position = last + 1, language);
3. stages the step metadata (block tables, slot mapping, sequence lengths, positions, expert
   routing; `step_buffers.py`) into persistent buffers with one host-to-device copy, and runs
   `model.forward_flat` on the engine-allocated paged KV cache with no host sync;
4. computes logits only for the last token of sequences that complete all their known tokens,
   masks the rows of constrained requests with their grammar's bitmask (structured/bitmask.py;
   nothing happens when no row is constrained) and samples one id for each.

A decode-only step (every sequence adds one generated token) goes to `decode_graphs` when the
engine set one (`cuda_graphs.py`: static buffers, padding to a batch-size bucket, CUDA-graph
replay); any step with a prefill chunk runs eagerly as above.

Per request it keeps the prompt's positions and masks (computed once over the whole prompt,
as chunked prefill requires) and the image features until the prompt is prefilled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cogvlm_ray.contracts import VISION_TOKEN_TYPE
from cogvlm_ray.engine.cuda_graphs import DecodeGraphRunner
from cogvlm_ray.engine.image_cache import ImageFeatureCache
from cogvlm_ray.engine.request import Request
from cogvlm_ray.engine.sampler import Sampler, SamplingRow
from cogvlm_ray.engine.scheduler import RunnerOutput, ScheduledRequest, SchedulerOutput
from cogvlm_ray.engine.step_buffers import StagedStep, StepBuffers, stage_step
from cogvlm_ray.engine.structured.bitmask import GrammarBitmask
from cogvlm_ray.model.layout import build_position_ids, build_vision_expert_mask
from cogvlm_ray.model.pixels import normalize_image

logger = logging.getLogger(__name__)


@dataclass
class _PromptState:
    """Per-request layout, computed once over the whole prompt (host lists: a step slices them
    and builds each input tensor once for the whole batch)."""

    positions: list[int]
    """[P] rotary positions."""
    vision_expert_mask: list[bool]
    """[P]."""
    image_token_mask: list[bool]
    """[P]; positions that receive image rows."""
    image_rows_before: list[int]
    """[P + 1]; image rows used by prompt tokens [0, i) (where a chunk's rows start)."""
    image_features: torch.Tensor | None = None
    """[num_image_tokens, H] while the prompt is being prefilled."""

    @property
    def last_position(self) -> int:
        return self.positions[-1]


@dataclass
class StepInputs:
    """The model inputs of one step (flat batch of T new tokens from B sequences)."""

    staged: StagedStep
    """Token ids, positions, attention metadata, expert routing, image rows' index, sampled rows:
    views of the persistent step buffers, copied to the device in one copy."""
    image_embeds: torch.Tensor | None
    """[N_img, H]: the image rows this step's chunks cover, in flat order."""
    sampled: list[int]
    """Sequences (indices into the scheduled list) whose last new token is sampled."""


def input_device(model: Any) -> torch.device:
    """Where token ids go in: the embedding's device (the first device of a sharded model)."""
    device = getattr(model, "embed_device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


class ModelRunner:
    def __init__(
        self,
        model: Any,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        image_cache: ImageFeatureCache,
        eos_token_ids: tuple[int, ...],
        max_num_seqs: int = 32,
        *,
        max_num_batched_tokens: int = 4096,
        max_model_len: int = 8192,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.image_cache = image_cache
        self.eos_token_ids = eos_token_ids
        self.device = input_device(model)
        self.grammar_bitmask = GrammarBitmask(model.model_config.vocab_size)
        self._states: dict[str, _PromptState] = {}
        self.sampler = Sampler(model.model_config.vocab_size, max_num_seqs)
        self.buffers = StepBuffers(
            max_num_batched_tokens, max_num_seqs, -(-max_model_len // block_size), self.device
        )
        self.decode_graphs: DecodeGraphRunner | None = None
        """Set by the engine where decode steps run padded (and, on CUDA, as graph replays)."""

    def release(self, request_id: str) -> None:
        """Forget a finished request's state (layout, generator, token counts)."""
        self._states.pop(request_id, None)
        self.sampler.release(request_id)

    def _state(self, request: Request) -> _PromptState:
        state = self._states.get(request.request_id)
        if state is None:
            types = torch.tensor(request.token_type_ids, dtype=torch.long)
            is_image = types == VISION_TOKEN_TYPE
            rows_before = [0, *is_image.long().cumsum(0).tolist()]
            state = _PromptState(
                positions=build_position_ids(types).tolist(),
                vision_expert_mask=build_vision_expert_mask(types).tolist(),
                image_token_mask=is_image.tolist(),
                image_rows_before=rows_before,
            )
            self._states[request.request_id] = state
        return state

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one step; returns the sampled id of every sequence that completed its known tokens."""
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return RunnerOutput()
        if self._is_graph_decode(scheduled):
            return self._run_decode_graph(scheduled)
        image_cache_hits = self._load_image_features(scheduled)
        inputs = self._prepare_inputs(scheduled)
        staged = inputs.staged
        hidden = self.model.forward_flat(
            staged.input_ids,
            staged.positions,
            None,
            self.kv_caches,
            staged.attn_metadata,
            image_embeds=inputs.image_embeds,
            expert_routing=staged.expert_routing,
            image_token_index=staged.image_token_index,
        )  # [T, H]
        # Logits only for the last token of sequences that now have all their tokens computed.
        if not inputs.sampled:
            return RunnerOutput(image_cache_hits=image_cache_hits)
        sample_rows = staged.sample_rows.to(hidden.device)
        return self._sample(
            [scheduled[b] for b in inputs.sampled], hidden.index_select(0, sample_rows), image_cache_hits
        )

    def _sample(
        self, items: list[ScheduledRequest], hidden: torch.Tensor, image_cache_hits: dict[str, bool]
    ) -> RunnerOutput:
        """One new token for each of `items` from its last hidden state (`hidden` `[len(items), H]`)."""
        logits = self.model.compute_logits(hidden)  # [B_sampled, V] float32
        token_bitmask = self.grammar_bitmask.fill([item.request.grammar for item in items], logits.device)
        rows = [self._sampling_row(item.request) for item in items]
        sampled = self.sampler.sample(logits, rows, token_bitmask=token_bitmask)
        request_ids = [item.request.request_id for item in items]
        return RunnerOutput(
            dict(zip(request_ids, sampled.token_ids, strict=True)),
            image_cache_hits,
            {rid: lp for rid, lp in zip(request_ids, sampled.logprobs, strict=True) if lp is not None},
        )

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        """The flat batch: each request's chunk of prompt and/or generated tokens, concatenated.

        Everything is built as host lists and staged into the persistent step buffers with one
        host-to-device copy (`step_buffers.py`), so the forward never reads the device.
        """
        token_ids: list[int] = []
        positions: list[int] = []
        expert_mask: list[bool] = []
        image_mask: list[bool] = []
        image_rows: list[torch.Tensor] = []
        for item in scheduled:
            request, state = item.request, self._state(item.request)
            start, end, num_prompt = item.num_computed_tokens, item.end, request.num_prompt_tokens
            token_ids.extend(request.token_ids(start, end))
            if start < num_prompt:  # prompt part of the chunk: slices of the whole-prompt layout
                prompt_end = min(end, num_prompt)
                positions.extend(state.positions[start:prompt_end])
                expert_mask.extend(state.vision_expert_mask[start:prompt_end])
                image_mask.extend(state.image_token_mask[start:prompt_end])
                first_row, last_row = state.image_rows_before[start], state.image_rows_before[prompt_end]
                if last_row > first_row:
                    assert state.image_features is not None, "image features were not loaded"
                    image_rows.append(state.image_features[first_row:last_row])
                if prompt_end == num_prompt:
                    state.image_features = None  # the cache (or nobody) keeps them from here on
            if end > num_prompt:  # generated tokens: language type, positions continue after the prompt
                first = state.last_position + 1 + max(start, num_prompt) - num_prompt
                num_new = end - max(start, num_prompt)
                positions.extend(range(first, first + num_new))
                expert_mask.extend([False] * num_new)
                image_mask.extend([False] * num_new)

        sampled = [b for b, item in enumerate(scheduled) if item.samples]
        query_lens = [item.num_new_tokens for item in scheduled]
        block_tables = [item.block_table for item in scheduled]
        self._ensure_buffers(len(token_ids), len(scheduled), max(map(len, block_tables), default=0))
        staged = stage_step(
            self.buffers,
            token_ids=token_ids,
            positions=positions,
            is_vision=expert_mask,
            is_image=image_mask if image_rows else [],
            query_lens=query_lens,
            context_lens=[item.num_computed_tokens for item in scheduled],
            block_tables=block_tables,
            sampled_seqs=sampled,
            block_size=self.block_size,
        )
        return StepInputs(staged, torch.cat(image_rows) if image_rows else None, sampled)

    def _ensure_buffers(self, num_tokens: int, num_seqs: int, num_blocks: int) -> None:
        """Grow the step buffers for a step beyond the limits they were sized for (not in the engine,
        which sizes them from its config; a graph runner must never see this happen)."""
        b = self.buffers
        if not b.fits(num_tokens, num_seqs, num_blocks):
            logger.warning(
                "growing the step buffers for %d tokens / %d seqs / %d blocks",
                num_tokens,
                num_seqs,
                num_blocks,
            )
            self.buffers = StepBuffers(
                max(b.max_num_tokens, num_tokens),
                max(b.max_num_seqs, num_seqs),
                max(b.max_blocks_per_seq, num_blocks),
                self.device,
            )

    def _sampling_row(self, request: Request) -> SamplingRow:
        params = request.sampling_params
        suppress = params.stop_token_ids + (() if params.ignore_eos else self.eos_token_ids)
        return SamplingRow(
            request.request_id, params, request.prompt_token_ids, request.output_token_ids, suppress
        )

    def _load_image_features(self, scheduled: list[ScheduledRequest]) -> dict[str, bool]:
        """Give every request whose chunk touches its image the features: cache hit or one batched tower call.

        Returns, per request id, whether the tower was skipped for it; the engine records that on
        the request (this runs on the worker thread, which never writes request state).
        """
        hits: dict[str, bool] = {}
        misses: dict[str, list[Request]] = {}
        for item in scheduled:
            request = item.request
            if not request.has_image or item.num_computed_tokens >= request.num_prompt_tokens:
                continue
            state = self._state(request)
            prompt_end = min(item.end, request.num_prompt_tokens)
            rows_before = state.image_rows_before
            chunk_rows = rows_before[prompt_end] - rows_before[item.num_computed_tokens]
            if chunk_rows == 0:
                if rows_before[item.num_computed_tokens] == rows_before[-1]:
                    hits[request.request_id] = True  # the whole image span came from the prefix cache
                continue
            if state.image_features is not None:
                continue
            assert request.image_hash is not None
            if request.image_hash in misses:  # same image twice in one step: one tower row
                misses[request.image_hash].append(request)
                hits[request.request_id] = True
                continue
            features = self.image_cache.get(request.image_hash)
            hits[request.request_id] = features is not None
            if features is not None:
                state.image_features = features
            else:
                misses[request.image_hash] = [request]
        if not misses:
            return hits
        # uint8 goes to the device (4x smaller than float32) and is normalised there.
        pixels = normalize_image(
            np.stack([requests[0].image for requests in misses.values()]), device=self.device
        )
        features = self.model.encode_images(pixels)  # [N, num_image_tokens, H]
        for i, (image_hash, requests) in enumerate(misses.items()):
            row = features[i].clone() if len(misses) > 1 else features[0]  # own storage: exact cache bytes
            self.image_cache.put(image_hash, row)
            for request in requests:
                self._state(request).image_features = row
        logger.debug("vision tower ran on %d new image(s)", len(misses))
        return hits

    def _is_graph_decode(self, scheduled: list[ScheduledRequest]) -> bool:
        """A decode-only step (one generated token per sequence) that the graph runner can hold."""
        graphs = self.decode_graphs
        if graphs is None:
            return False
        if not all(
            item.samples
            and item.num_new_tokens == 1
            and item.num_computed_tokens >= item.request.num_prompt_tokens
            for item in scheduled
        ):
            return False
        return graphs.fits(len(scheduled), [item.block_table for item in scheduled])

    def _run_decode_graph(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        """A decode-only step through the graph runner (padded, static buffers); every row samples."""
        assert self.decode_graphs is not None
        token_ids, positions = [], []
        for item in scheduled:
            request, start = item.request, item.num_computed_tokens
            token_ids.append(request.output_token_ids[start - request.num_prompt_tokens])
            # generated tokens are language; their positions continue after the prompt's last one
            positions.append(self._state(request).last_position + 1 + start - request.num_prompt_tokens)
        hidden = self.decode_graphs.run(
            token_ids,
            positions,
            [item.num_computed_tokens for item in scheduled],
            [item.block_table for item in scheduled],
        )  # [B, H]
        return self._sample(scheduled, hidden, {})
