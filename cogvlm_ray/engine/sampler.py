"""Batched sampler: last-token logits [B, V] float32 -> one token id (and logprobs) per sequence.

Per step the runner hands over one `SamplingRow` per sequence; `SamplingBatch.build` turns
them into device tensors (two host-to-device copies), and every transform is one op over the
rows that need it (`engine/sampling_ops.py`):

    penalties (repetition: HF rule over prompt + output ids; presence / frequency: OpenAI rule
    over output counts; both kept per request on the device, `token_counts.py`)
    -> logit_bias (one scatter) -> min_tokens suppression of stop ids (one fill)
    -> structured-output bitmask (one op; `token_bitmask`, nobody sets it yet)
    -> [logprobs are taken here, at the row's temperature]
    -> greedy rows: one argmax
    -> sampled rows: temperature -> min_p -> top-k -> top-p -> one draw

The repetition penalty, min_tokens, temperature, top-k, top-p order is HF `generate`'s (the
official demos use it). Seeded rows draw from their own `torch.Generator`, so the same seed
gives the same tokens whatever the batch; unseeded rows share one draw. A step copies device
data to the host once: the sampled ids, with the logprobs packed into the same copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from cogvlm_ray.contracts import SamplingParams, TokenLogprob
from cogvlm_ray.engine.sampling_ops import (
    NEG_INF,
    apply_min_p,
    apply_penalties,
    apply_token_bitmask,
    apply_top_k_top_p,
    compute_logprobs,
    draw,
)
from cogvlm_ray.engine.token_counts import TokenCounts


@dataclass
class SamplingRow:
    """One sequence to sample for (host data; lists are the request's own, not copies)."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Generated so far; the penalties' counts are rebuilt from these only when out of sync."""
    suppress_token_ids: tuple[int, ...] = ()
    """Ids masked while fewer than params.min_tokens tokens are generated (eos + stop ids)."""

    @property
    def is_suppressing(self) -> bool:
        return len(self.output_token_ids) < self.params.min_tokens and bool(self.suppress_token_ids)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    """Per row: the sampled token's logprob (token text not filled in) or None if not asked."""


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one request; a None seed draws a fresh random one. Seeds wrap mod 2**64."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 64) if seed is not None else random.getrandbits(63))
    return generator


class _Packer:
    """Collects small host lists into one int64 and one float32 tensor: two copies to the device."""

    def __init__(self) -> None:
        self._ints: list[int] = []
        self._floats: list[float] = []
        self._spans: dict[str, tuple[bool, int, int]] = {}

    def add(self, name: str, values: list[int] | list[float], is_float: bool = False) -> None:
        store = self._floats if is_float else self._ints
        self._spans[name] = (is_float, len(store), len(store) + len(values))
        store.extend(values)  # type: ignore[arg-type]

    def to_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        ints = torch.tensor(self._ints, dtype=torch.long)
        floats = torch.tensor(self._floats, dtype=torch.float32)
        if device.type == "cuda":  # pinned, so the copies are asynchronous and need no sync
            ints, floats = ints.pin_memory(), floats.pin_memory()
        ints, floats = ints.to(device, non_blocking=True), floats.to(device, non_blocking=True)
        return {
            name: (floats if is_float else ints)[start:end]
            for name, (is_float, start, end) in self._spans.items()
        }


@dataclass
class SamplingBatch:
    """Per-step tensors for one `sample` call, built once from the rows.

    Index tensors select the rows a transform applies to (`*_rows`, int64 into the batch);
    the host keeps only what it needs to unpack the result.
    """

    num_rows: int
    temperature: torch.Tensor
    """float32 [B]: the row's temperature, 1 for greedy rows (their logprobs use it)."""
    sampled_rows: torch.Tensor
    """int64 [S]: non-greedy rows, unseeded ones first (they share one draw)."""
    num_unseeded: int
    top_k: torch.Tensor | None
    """int64 [S] in [1, V]; None when no sampled row uses top-k."""
    max_top_k: int | None
    """The largest top_k below V among the sampled rows (host)."""
    top_p: torch.Tensor | None
    """float32 [S]; None when no sampled row uses top-p."""
    min_p: torch.Tensor | None
    """float32 [S]; None when no sampled row uses min_p."""
    generators: list[tuple[int, torch.Generator]]
    """(index into sampled_rows, generator) for seeded rows."""
    penalty_rows: torch.Tensor
    """int64 [P]: rows with a repetition / presence / frequency penalty."""
    penalty_slots: torch.Tensor
    """int64 [P]: their rows in `TokenCounts`."""
    penalty_positions: torch.Tensor
    """int64 [P]: how many ids each has seen (where its sampled id goes)."""
    max_num_seen: int
    """The longest of those (host)."""
    repetition_penalty: torch.Tensor | None
    """float32 [P]; None when no row uses this kind (and likewise the next two)."""
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    bias_index: tuple[torch.Tensor, torch.Tensor] | None
    """(rows, token ids) of logit_bias entries, with `bias_values`."""
    bias_values: torch.Tensor | None
    suppress_index: tuple[torch.Tensor, torch.Tensor] | None
    """(rows, token ids) masked for min_tokens."""
    logprob_rows: torch.Tensor
    """int64 [L]: rows that asked for logprobs."""
    logprob_row_ids: list[int] = field(default_factory=list)
    """[L] host copy of logprob_rows."""
    num_top_logprobs: list[int] = field(default_factory=list)
    """[L] host: top_logprobs per logprob row."""
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None
    """(int32 [N, ceil(V/32)] bitmask, int64 [N] rows): a structured-output hook, set by the caller."""

    @property
    def num_sampled(self) -> int:
        return self.sampled_rows.shape[0]

    @classmethod
    def build(
        cls,
        rows: list[SamplingRow],
        vocab_size: int,
        device: torch.device,
        generators: dict[int, torch.Generator],
        penalty_slots: list[tuple[int, int]],
    ) -> SamplingBatch:
        """`generators`: row -> generator for seeded sampled rows; `penalty_slots`: the
        `TokenCounts` (slot, number of ids seen) of each row with penalties, in row order."""
        unseeded = [i for i, r in enumerate(rows) if not r.params.is_greedy and i not in generators]
        sampled = unseeded + sorted(generators)
        penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
        logprob_rows = [i for i, r in enumerate(rows) if r.params.logprobs]
        packer = _Packer()
        packer.add("temperature", [1.0 if r.params.is_greedy else r.params.temperature for r in rows], True)
        packer.add("sampled_rows", sampled)
        sampled_params = [rows[i].params for i in sampled]
        top_ks = [p.top_k for p in sampled_params if 0 < p.top_k < vocab_size]
        uses_top_p = any(p.top_p < 1.0 for p in sampled_params)
        uses_min_p = any(p.min_p > 0.0 for p in sampled_params)
        packer.add("top_k", [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in sampled_params])
        packer.add("top_p", [p.top_p for p in sampled_params], True)
        packer.add("min_p", [p.min_p for p in sampled_params], True)
        packer.add("penalty_rows", penalised)
        packer.add("penalty_slots", [slot for slot, _ in penalty_slots])
        packer.add("penalty_positions", [num_seen for _, num_seen in penalty_slots])
        used_penalties = set()  # kinds some row uses; the others are skipped
        for name, neutral in (
            ("repetition_penalty", 1.0),
            ("frequency_penalty", 0.0),
            ("presence_penalty", 0.0),
        ):
            values = [getattr(rows[i].params, name) for i in penalised]
            packer.add(name, values, True)
            if any(v != neutral for v in values):
                used_penalties.add(name)
        bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
        packer.add("bias_rows", [i for i, _, _ in bias])
        packer.add("bias_ids", [t for _, t, _ in bias])
        packer.add("bias_values", [b for _, _, b in bias], True)
        suppress = [(i, t) for i, r in enumerate(rows) if r.is_suppressing for t in r.suppress_token_ids]
        packer.add("suppress_rows", [i for i, _ in suppress])
        packer.add("suppress_ids", [t for _, t in suppress])
        packer.add("logprob_rows", logprob_rows)
        t = packer.to_device(device)
        position = {row: k for k, row in enumerate(sampled)}
        return cls(
            num_rows=len(rows),
            temperature=t["temperature"],
            sampled_rows=t["sampled_rows"],
            num_unseeded=len(unseeded),
            top_k=t["top_k"] if top_ks else None,
            max_top_k=max(top_ks, default=None),
            top_p=t["top_p"] if uses_top_p else None,
            min_p=t["min_p"] if uses_min_p else None,
            generators=[(position[row], g) for row, g in generators.items()],
            penalty_rows=t["penalty_rows"],
            penalty_slots=t["penalty_slots"],
            penalty_positions=t["penalty_positions"],
            max_num_seen=max((num_seen for _, num_seen in penalty_slots), default=0),
            repetition_penalty=t["repetition_penalty"] if "repetition_penalty" in used_penalties else None,
            frequency_penalty=t["frequency_penalty"] if "frequency_penalty" in used_penalties else None,
            presence_penalty=t["presence_penalty"] if "presence_penalty" in used_penalties else None,
            bias_index=(t["bias_rows"], t["bias_ids"]) if bias else None,
            bias_values=t["bias_values"] if bias else None,
            suppress_index=(t["suppress_rows"], t["suppress_ids"]) if suppress else None,
            logprob_rows=t["logprob_rows"],
            logprob_row_ids=logprob_rows,
            num_top_logprobs=[rows[i].params.top_logprobs for i in logprob_rows],
        )


class Sampler:
    """Samples for a batch of rows; owns the per-request device state (generators, token counts).

    Call `release(request_id)` when a request finishes. State lives on the logits' device.
    """

    def __init__(self, vocab_size: int, max_num_seqs: int = 32) -> None:
        self.vocab_size = vocab_size
        self._max_num_seqs = max_num_seqs
        self._generators: dict[str, torch.Generator] = {}
        self._shared_generators: dict[torch.device, torch.Generator] = {}
        self._counts: TokenCounts | None = None

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        if self._counts is not None:
            self._counts.release(request_id)

    def sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplerOutput:
        """Sample one id per row of `logits` [B, V] float32 (not modified)."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sequences")
        batch = self.build_batch(rows, logits.device)
        batch.token_bitmask = token_bitmask
        token_ids, logprobs = self.sample_batch(logits, batch)
        if batch.penalty_rows.numel():
            assert self._counts is not None
            self._counts.add_sampled(
                [r.request_id for r in rows if r.params.has_penalties],
                batch.penalty_slots,
                batch.penalty_positions,
                token_ids[batch.penalty_rows],
            )
        return self._to_host(token_ids, logprobs, batch)

    def build_batch(self, rows: list[SamplingRow], device: torch.device) -> SamplingBatch:
        generators = {
            i: self._generator(r.request_id, r.params.seed, device)
            for i, r in enumerate(rows)
            if not r.params.is_greedy and r.params.seed is not None
        }
        slots: list[tuple[int, int]] = []
        if any(r.params.has_penalties for r in rows):
            if self._counts is None:
                self._counts = TokenCounts(self.vocab_size, device, self._max_num_seqs)
            slots = [
                self._counts.slot_for(r.request_id, r.prompt_token_ids, r.output_token_ids)
                for r in rows
                if r.params.has_penalties
            ]
        return SamplingBatch.build(rows, self.vocab_size, device, generators, slots)

    def sample_batch(
        self, logits: torch.Tensor, batch: SamplingBatch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """The device part: processed logits -> ids [B] (int64) and, when asked, the logprobs."""
        logits = self.process_logits(logits, batch)
        token_ids = logits.argmax(dim=-1)  # every greedy row in one op
        if batch.num_sampled:
            rows = batch.sampled_rows
            x = logits[rows] / batch.temperature[rows][:, None]
            if batch.min_p is not None:
                x = apply_min_p(x, batch.min_p)
            if batch.top_k is not None or batch.top_p is not None:
                x = apply_top_k_top_p(x, batch.top_k, batch.top_p, batch.max_top_k)
            shared = self._shared(logits.device)
            token_ids[rows] = draw(x.softmax(dim=-1), batch.generators, shared, batch.num_unseeded)
        logprobs = None
        if batch.logprob_rows.numel():
            rows = batch.logprob_rows
            x = logits[rows] / batch.temperature[rows][:, None]
            logprobs = compute_logprobs(x, token_ids[rows], max(batch.num_top_logprobs))
        return token_ids, logprobs

    def process_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Penalties, logit_bias, min_tokens suppression and the bitmask: the distribution rows
        are sampled from (before temperature and truncation). Returns a new tensor when any applies."""
        needs_copy = (
            batch.penalty_rows.numel()
            or batch.bias_index is not None
            or batch.suppress_index is not None
            or batch.token_bitmask is not None
        )
        if not needs_copy:
            return logits
        logits = logits.clone()  # the caller's logits stay as they are; everything below is in place
        if batch.penalty_rows.numel():
            assert self._counts is not None
            rows = batch.penalty_rows
            seen_ids, counts = self._counts.rows(batch.penalty_slots, batch.max_num_seen)
            logits[rows] = apply_penalties(
                logits[rows], seen_ids, counts,
                batch.repetition_penalty, batch.frequency_penalty, batch.presence_penalty,
            )  # fmt: skip
        if batch.bias_index is not None and batch.bias_values is not None:
            logits.index_put_(batch.bias_index, batch.bias_values, accumulate=True)
        if batch.suppress_index is not None:
            logits.index_put_(batch.suppress_index, logits.new_full((), NEG_INF))  # no host copy
        if batch.token_bitmask is not None:
            bitmask, row_index = batch.token_bitmask
            apply_token_bitmask(logits, bitmask, row_index)
        return logits

    def _to_host(
        self,
        token_ids: torch.Tensor,
        logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        batch: SamplingBatch,
    ) -> SamplerOutput:
        """The step's one device-to-host copy: ids, then (if asked) chosen / top logprobs and top ids."""
        num_rows = batch.num_rows
        if logprobs is None:
            return SamplerOutput(token_ids.cpu().tolist(), [None] * num_rows)
        chosen, top_values, top_ids = logprobs
        packed = torch.cat(
            [token_ids.double(), chosen.double(), top_values.double().flatten(), top_ids.double().flatten()]
        )
        host = packed.cpu().tolist()
        ids = [int(t) for t in host[:num_rows]]
        num_lp, width = chosen.shape[0], top_values.shape[1]
        chosen_host = host[num_rows : num_rows + num_lp]
        values_at = num_rows + num_lp
        ids_at = values_at + num_lp * width
        out: list[TokenLogprob | None] = [None] * num_rows
        for k, row in enumerate(batch.logprob_row_ids):
            top = tuple(
                TokenLogprob(int(host[ids_at + k * width + j]), host[values_at + k * width + j])
                for j in range(batch.num_top_logprobs[k])
            )
            out[row] = TokenLogprob(ids[row], chosen_host[k], top_logprobs=top)
        return SamplerOutput(ids, out)

    def _generator(self, request_id: str, seed: int | None, device: torch.device) -> torch.Generator:
        generator = self._generators.get(request_id)
        if generator is None:
            generator = self._generators[request_id] = make_generator(seed, device)
        return generator

    def _shared(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = self._shared_generators[device] = make_generator(None, device)
        return generator
