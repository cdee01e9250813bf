"""Batched sampler: equal to the row-by-row reference, penalties / min_p / logit_bias against
plain per-row math, seeded reproducibility whatever the batch, logprobs, one host copy per step."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.engine.sampler import Sampler, SamplingRow, make_generator
from cogvlm_ray.engine.sampling_ops import apply_token_bitmask, apply_top_k_top_p
from cogvlm_ray.engine.token_counts import TokenCounts
from tests.unit.engine import sampler_reference as ref

V = 50
PROMPT = [3, 7, 7, 11, 42]


def logits(batch: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def row(request_id: str = "r", prompt=PROMPT, output=None, suppress=(), **params) -> SamplingRow:
    return SamplingRow(
        request_id, SamplingParams(**params), list(prompt), list(output or []), tuple(suppress)
    )


MIXED = [  # (params, suppress ids): greedy, seeded sampling, penalties, min_tokens
    (dict(temperature=0.0), ()),
    (dict(temperature=0.7, seed=1), ()),
    (dict(temperature=0.0, repetition_penalty=1.5), ()),
    (dict(temperature=1.3, top_k=5, seed=2), ()),
    (dict(temperature=0.9, top_p=0.8, seed=3, repetition_penalty=1.2), ()),
    (dict(temperature=1.0, top_k=10, top_p=0.5, seed=4), ()),
    (dict(temperature=0.0, min_tokens=3, max_tokens=8), (13, 14)),
    (dict(temperature=0.8, seed=5, min_tokens=2, max_tokens=8, repetition_penalty=0.7), (1, 2, 3)),
]


def test_batched_equals_the_row_by_row_reference_over_many_steps():
    """Greedy, seeded temperature / top-k / top-p, repetition penalty, min_tokens: the same ids
    as the old sampler, step after step (the device counts follow the sampled ids)."""
    sampler = Sampler(V)
    rows = [  # prompts of different lengths: the penalties' id rows are padded
        row(f"r{i}", prompt=[(7 * j + i) % V for j in range(2 + 3 * i)], **params, suppress=sup)
        for i, (params, sup) in enumerate(MIXED)
    ]
    ref_rows = [
        ref.ReferenceRow(
            r.params, None if r.params.is_greedy else make_generator(r.params.seed, "cpu"), [], 0, sup
        )
        for r, (_, sup) in zip(rows, MIXED, strict=True)
    ]
    for step in range(12):
        x = logits(len(rows), seed=step)
        for r, rr in zip(rows, ref_rows, strict=True):
            rr.token_ids = r.prompt_token_ids + r.output_token_ids
            rr.num_output_tokens = len(r.output_token_ids)
        ours = sampler.sample(x, rows).token_ids
        assert ours == ref.sample(x, ref_rows), step
        for r, t in zip(rows, ours, strict=True):
            r.output_token_ids.append(t)


def test_top_k_top_p_match_hf_masks_batched():
    x = logits(4, seed=3)
    cases = [(5, 1.0), (V, 0.7), (10, 0.5), (V, 0.01)]
    ours = apply_top_k_top_p(x, torch.tensor([k for k, _ in cases]), torch.tensor([p for _, p in cases]))
    for i, (top_k, top_p) in enumerate(cases):
        hf = x[i : i + 1].clone()
        if top_k < V:
            hf = TopKLogitsWarper(top_k)(None, hf)
        if top_p < 1.0:
            hf = TopPLogitsWarper(top_p)(None, hf)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(hf[0])), (top_k, top_p)
        kept = ~torch.isinf(ours[i])
        assert torch.equal(ours[i][kept], x[i][kept])


def test_top_k_with_a_bounded_topk_gives_the_same_mask():
    x = logits(3, seed=6)
    top_k = torch.tensor([3, V, 10])  # V: that row has no top-k
    ours = apply_top_k_top_p(x, top_k, None, max_top_k=10)
    assert torch.equal(ours, apply_top_k_top_p(x, top_k, None))  # topk over the whole vocabulary
    for i, k in enumerate(top_k.tolist()):
        hf = TopKLogitsWarper(k)(None, x[i : i + 1].clone()) if k < V else x[i : i + 1]
        assert torch.equal(ours[i], hf[0])


def test_top_k_limits_the_draws():
    x = logits(1, seed=5)
    allowed = set(torch.topk(x[0], 3).indices.tolist())
    sampler = Sampler(V)
    draws = {sampler.sample(x, [row(temperature=1.5, top_k=3, seed=1)]).token_ids[0] for _ in range(200)}
    assert draws <= allowed and len(draws) > 1


def reference_processed(x: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """Plain per-row math for penalties, logit_bias and min_tokens (one [V] row)."""
    p, out = r.params, x.clone()
    seen = set(r.prompt_token_ids) | set(r.output_token_ids)
    counts = Counter(r.output_token_ids)
    for t in range(x.shape[0]):
        if t in seen:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        out[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    for t, b in p.logit_bias:
        out[t] += b
    if len(r.output_token_ids) < p.min_tokens:
        for t in r.suppress_token_ids:
            out[t] = -math.inf
    return out


PENALISED = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(presence_penalty=-1.0, frequency_penalty=2.0, repetition_penalty=1.3),
    dict(logit_bias={4: 100.0, 9: -100.0, 20: 3.5}),
    dict(logit_bias={2: -2.0}, frequency_penalty=-0.5, min_tokens=5, max_tokens=9),
    dict(),
]


def test_penalties_logit_bias_and_min_tokens_equal_per_row_math():
    sampler = Sampler(V)
    rows = [
        row(f"p{i}", output=[4, 4, 9, 30, 4], suppress=(0, 1), temperature=0.0, **params)
        for i, params in enumerate(PENALISED)
    ]
    x = logits(len(rows), seed=11)
    batch = sampler.build_batch(rows, x.device)
    processed = sampler.process_logits(x, batch)
    for i, r in enumerate(rows):
        torch.testing.assert_close(processed[i], reference_processed(x[i], r), rtol=1e-6, atol=1e-5)
    ids = sampler.sample(x, rows).token_ids
    assert ids[3] == 4  # +100 bias wins the argmax
    assert ids == [int(reference_processed(x[i], r).argmax()) for i, r in enumerate(rows)]


def test_device_counts_follow_the_sampled_ids_and_resync_when_the_host_disagrees(monkeypatch):
    fills: list[int] = []
    original_fill = TokenCounts._fill
    monkeypatch.setattr(
        TokenCounts, "_fill", lambda self, slot, *a: (fills.append(slot), original_fill(self, slot, *a))
    )
    sampler = Sampler(V, max_num_seqs=1)  # the table must grow for the second request
    sampler._counts = TokenCounts(V, torch.device("cpu"), num_slots=1, capacity=8)  # and its rows
    a, b = row("a", temperature=0.0, frequency_penalty=1.0), row("b", temperature=0.0, presence_penalty=1.0)
    for step in range(6):
        x = logits(2, seed=20 + step)
        batch = sampler.build_batch([a, b], x.device)
        processed = sampler.process_logits(x, batch)
        for i, r in enumerate((a, b)):
            torch.testing.assert_close(processed[i], reference_processed(x[i], r), rtol=1e-6, atol=1e-5)
        for r, t in zip((a, b), sampler.sample(x, [a, b]).token_ids, strict=True):
            r.output_token_ids.append(t)
    assert len(fills) == 2, "each row is filled from the host once, then updated on the device"
    b.output_token_ids.pop()  # e.g. a sampled id that was never appended: the row is rebuilt
    x = logits(2, seed=99)
    processed = sampler.process_logits(x, sampler.build_batch([a, b], x.device))
    torch.testing.assert_close(processed[1], reference_processed(x[1], b), rtol=1e-6, atol=1e-5)
    assert len(fills) == 3
    sampler.release("a")
    sampler.release("b")


def test_min_p_keeps_tokens_above_the_scaled_top_probability():
    x = logits(1, seed=7) / 3
    probs = (x[0] / 0.9).softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < V // 2
    sampler = Sampler(V)
    r = row(temperature=0.9, min_p=0.2, seed=3)
    draws = {sampler.sample(x, [r]).token_ids[0] for _ in range(300)}
    assert draws <= allowed and len(draws) > 1


def test_same_seed_same_tokens_regardless_of_batch_company():
    x = logits(4, seed=9)
    alone_sampler, batched_sampler = Sampler(V), Sampler(V)
    alone = row("s", temperature=0.9, top_p=0.9, seed=1234, presence_penalty=0.5)
    seq_alone = []
    for _ in range(20):
        seq_alone.append(alone_sampler.sample(x[2:3], [alone]).token_ids[0])
        alone.output_token_ids.append(seq_alone[-1])
    company = [row("u1", temperature=1.0), row("g", temperature=0.0, repetition_penalty=1.4)]
    seeded = row("s", temperature=0.9, top_p=0.9, seed=1234, presence_penalty=0.5)
    seq_batched = []
    for _ in range(20):
        ids = batched_sampler.sample(x, [company[0], company[1], seeded, row("u2", temperature=1.2, top_k=4)])
        seq_batched.append(ids.token_ids[2])
        seeded.output_token_ids.append(ids.token_ids[2])
        company[1].output_token_ids.append(ids.token_ids[1])
    assert seq_alone == seq_batched
    other = Sampler(V)
    assert [
        other.sample(x[2:3], [row("o", temperature=0.9, top_p=0.9, seed=4321)]).token_ids[0]
        for _ in range(20)
    ] != seq_alone


def test_logprobs_are_log_softmax_of_the_processed_logits_at_the_row_temperature():
    sampler = Sampler(V)
    rows = [
        row("g", temperature=0.0, logprobs=True, top_logprobs=5, repetition_penalty=1.2),
        row("s", temperature=0.7, seed=1, logprobs=True, top_logprobs=3, logit_bias={1: 2.0}, top_k=4),
        row("n", temperature=0.0),
        row("z", temperature=1.5, seed=2, logprobs=True, frequency_penalty=1.0, output=[5, 5]),
    ]
    x = logits(len(rows), seed=4)
    expected = [
        reference_processed(x[i], r).div(1.0 if r.params.is_greedy else r.params.temperature).log_softmax(-1)
        for i, r in enumerate(rows)
    ]
    out = sampler.sample(x, rows)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(expected[i][lp.token_id]), abs=1e-5)
        assert len(lp.top_logprobs) == rows[i].params.top_logprobs
        top = torch.topk(expected[i], len(lp.top_logprobs))
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
    greedy = out.logprobs[0]
    assert greedy is not None and greedy.logprob == max(t.logprob for t in greedy.top_logprobs)
    assert greedy.token_id == greedy.top_logprobs[0].token_id


class _SyncCounter(TorchDispatchMode):
    SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.item")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(name) for name in self.SYNC_OPS):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_a_step_copies_to_the_host_once(monkeypatch, with_logprobs):
    """No .item() / nonzero / truth tests on tensors; exactly one .cpu() and one .tolist() (on its result)."""
    calls: list[str] = []
    for name in ("cpu", "tolist", "numpy", "item"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    sampler = Sampler(V)
    rows = [
        row(f"r{i}", **params, suppress=sup, logprobs=with_logprobs) for i, (params, sup) in enumerate(MIXED)
    ]
    rows.append(row("b", temperature=0.5, min_p=0.1, logit_bias={3: 1.0}, presence_penalty=0.3, seed=None))
    x = logits(len(rows), seed=1)
    sampler.sample(x, rows)  # first step fills the count rows from the host (H2D only)
    calls.clear()
    with _SyncCounter() as guard:
        out = sampler.sample(x, rows)
    assert guard.syncs == []
    assert calls == ["cpu", "tolist"]
    assert len(out.token_ids) == len(rows) and all(isinstance(t, int) for t in out.token_ids)


def test_token_bitmask_matches_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    vocab = 70  # not a multiple of 32
    x = logits(3, seed=2, vocab=vocab)
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, math.ceil(vocab / 32)), dtype=torch.int32, generator=gen)
    row_index = torch.tensor([2, 0])
    ours = apply_token_bitmask(x.clone(), bitmask, row_index)
    theirs = x.clone()
    xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=row_index.tolist())
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[1], x[1])  # rows without a mask are untouched


def test_bitmask_hook_constrains_sampling():
    sampler = Sampler(V)
    allowed = {5, 33, 47}
    bits = torch.zeros(1, 2, dtype=torch.int64)
    for t in allowed:
        bits[0, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).expand(2, 2)  # row 0 unused
    rows = [row("a", temperature=0.0), row("b", temperature=1.0, seed=3)]
    x = logits(2, seed=8)
    draws = {
        sampler.sample(x, rows, token_bitmask=(bitmask, torch.tensor([1]))).token_ids[1] for _ in range(50)
    }
    assert draws <= allowed
    assert sampler.sample(x, rows, token_bitmask=(bitmask, torch.tensor([1]))).token_ids[0] == int(
        x[0].argmax()
    )
