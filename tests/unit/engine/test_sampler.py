"""Sampler: greedy, HF-equivalent processors, per-request seeded reproducibility."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.engine.sampler import (
    SamplingRow,
    apply_repetition_penalty,
    apply_top_k_top_p,
    make_generator,
    sample,
)

V = 50


def row(seed: int | None = 0, history: list[int] | None = None, num_out: int = 0, suppress=(), **params):
    sp = SamplingParams(**params)
    generator = None if sp.is_greedy else make_generator(seed, "cpu")
    return SamplingRow(sp, generator, history or [], num_out, tuple(suppress))


def logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    x = logits(3)
    assert sample(x, [row(temperature=0.0) for _ in range(3)]) == x.argmax(-1).tolist()


def test_repetition_penalty_matches_hf():
    x = logits(1)[0]
    history = [3, 7, 7, 11, 42]
    ours = apply_repetition_penalty(x, history, 1.3)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), x[None].clone())[0]
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)


def test_top_k_top_p_match_hf_masks():
    x = logits(1, seed=3)[0]
    for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5), (0, 0.01)]:
        ours = apply_top_k_top_p(x, top_k, top_p)
        hf = x[None].clone()
        if top_k:
            hf = TopKLogitsWarper(top_k)(None, hf)
        if top_p < 1.0:
            hf = TopPLogitsWarper(top_p)(None, hf)
        assert torch.equal(torch.isinf(ours), torch.isinf(hf[0])), (top_k, top_p)


def test_top_k_limits_the_draws():
    x = logits(1, seed=5)
    allowed = set(torch.topk(x[0], 3).indices.tolist())
    r = row(seed=1, temperature=1.5, top_k=3)
    draws = {sample(x, [r])[0] for _ in range(200)}
    assert draws <= allowed and len(draws) > 1


def test_same_seed_same_tokens_regardless_of_batch_company():
    x = logits(4, seed=9)
    alone = row(seed=1234, temperature=0.9, top_p=0.9)
    seq_alone = [sample(x[2:3], [alone])[0] for _ in range(20)]
    rows = [row(seed=s, temperature=1.0) for s in (1, 2)] + [row(seed=1234, temperature=0.9, top_p=0.9)]
    rows.append(row(temperature=0.0))
    seq_batched = [sample(x, rows)[2] for _ in range(20)]
    assert seq_alone == seq_batched
    other_seed = row(seed=4321, temperature=0.9, top_p=0.9)
    assert [sample(x[2:3], [other_seed])[0] for _ in range(20)] != seq_alone


def test_min_tokens_suppresses_stop_ids():
    x = torch.zeros(1, V)
    x[0, 13] = 10.0  # eos would win
    suppressed = row(temperature=0.0, min_tokens=2, max_tokens=5, num_out=1, suppress=(13,))
    assert sample(x, [suppressed]) != [13]
    reached = row(temperature=0.0, min_tokens=2, max_tokens=5, num_out=2, suppress=(13,))
    assert sample(x, [reached]) == [13]
