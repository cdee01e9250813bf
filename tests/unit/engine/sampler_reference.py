"""The row-by-row sampler the engine used before the batched one (engine/sampler.py), kept as
the reference the batched sampler must equal (tests) and the baseline it is timed against
(bench/sampler_bench.py). Not used by the engine.

Original docstring: last-token logits [B, V] float32 -> one token id per sequence.

Processing order follows HF `generate` (which the official demos use): repetition penalty
over prompt + generated ids, min_tokens suppression of stop ids, then temperature, top-k,
top-p, and a draw. Greedy rows take the argmax.

Reproducibility: each request owns a `torch.Generator` seeded from `SamplingParams.seed`
(random when None) and every random draw for that request comes from it, one row at a time,
so the same seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cogvlm_ray.contracts import SamplingParams


@dataclass
class ReferenceRow:
    """One sequence to sample for."""

    params: SamplingParams
    generator: torch.Generator | None
    """Per-request generator on the logits' device (None for greedy rows)."""
    token_ids: list[int]
    """Prompt + generated ids so far (for the repetition penalty)."""
    num_output_tokens: int
    suppress_token_ids: tuple[int, ...] = ()
    """Ids masked while num_output_tokens < params.min_tokens (eos + stop ids)."""


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one request; a None seed draws a fresh random one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return generator


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """HF rule on a [V] row: seen tokens' positive logits are divided by the penalty, negative multiplied."""
    if penalty == 1.0 or not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    seen = logits.gather(0, ids)
    logits = logits.clone()
    logits.scatter_(0, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask a [V] row to its top-k and then its top-p nucleus (at least one token kept)."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[-1] = False  # keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(0, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, row: ReferenceRow) -> int:
    """Process and draw one token from a [V] float32 row."""
    params = row.params
    logits = apply_repetition_penalty(logits, row.token_ids, params.repetition_penalty)
    if row.num_output_tokens < params.min_tokens and row.suppress_token_ids:
        ids = torch.tensor(row.suppress_token_ids, dtype=torch.long, device=logits.device)
        logits = logits.index_fill(0, ids, float("-inf"))
    if params.is_greedy:
        return int(torch.argmax(logits).item())
    logits = apply_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=row.generator).item())


def sample(logits: torch.Tensor, rows: list[ReferenceRow]) -> list[int]:
    """Sample one id per row of `logits` [B, V] float32. Plain greedy rows share one argmax."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sequences")
    plain_greedy = [
        r.params.is_greedy
        and r.params.repetition_penalty == 1.0
        and r.num_output_tokens >= r.params.min_tokens
        for r in rows
    ]
    argmax = torch.argmax(logits, dim=-1).tolist() if any(plain_greedy) else []
    return [int(argmax[i]) if plain_greedy[i] else sample_row(logits[i], row) for i, row in enumerate(rows)]
