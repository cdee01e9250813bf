"""Sampling features through the whole engine on the golden tiny CogVLM2: n choices sharing one
prefill, logprobs, OpenAI penalties / min_p / logit_bias next to golden greedy rows, validation."""

from __future__ import annotations

import asyncio
import math

import pytest

from cogvlm_ray.engine import SamplingParams
from cogvlm_ray.errors import InvalidRequestError, OverloadedError
from tests.unit.engine.fixture_prompts import CASES
from tests.unit.engine.test_engine import GREEDY, cases, collect, make_engine, model, run, tokenizer

__all__ = ["cases", "model", "tokenizer"]  # module-scoped fixtures shared with test_engine


def by_choice(outputs) -> dict[int, list[int]]:
    ids: dict[int, list[int]] = {}
    for out in outputs:
        ids.setdefault(out.index, []).extend(out.new_token_ids)
    return ids


def expected_cached_tokens(num_prompt: int, block_size: int) -> int:
    """Full prompt blocks a later choice adopts (the scheduler always recomputes >= 1 token)."""
    full = num_prompt // block_size
    return (full if full * block_size < num_prompt else full - 1) * block_size


def test_n_greedy_choices_are_identical_and_the_prompt_is_prefilled_once(model, tokenizer, cases):
    prompt, golden, _ = cases["chat_image"]

    async def main(n: int):
        engine = make_engine(model, tokenizer)
        outputs = (
            await collect(engine.add_request(prompt, SamplingParams(max_tokens=12, n=n, **GREEDY), "r"))
        )[2]
        await engine.shutdown()
        return outputs, engine.get_stats()

    outputs, stats = run(main(3))
    assert by_choice(outputs) == {0: golden, 1: golden, 2: golden}
    assert {out.request_id for out in outputs} == {"r"}
    finals = [out for out in outputs if out.finished]
    assert sorted(out.index for out in finals) == [0, 1, 2] and outputs[-1].finished
    assert all(out.finish_reason == "length" for out in finals)
    # Choice 0 computes the whole prompt; choices 1 and 2 adopt its full blocks from the prefix cache.
    num_prompt, cached = prompt.num_prompt_tokens, expected_cached_tokens(prompt.num_prompt_tokens, 4)
    assert cached > 0
    assert stats.prefix_cache_hit_tokens == 2 * cached
    assert stats.total_prompt_tokens == num_prompt + 2 * (num_prompt - cached)
    _, single = run(main(1))
    assert single.total_prompt_tokens == num_prompt


def test_n_seeded_choices_are_reproducible_and_choice_i_uses_seed_plus_i(model, tokenizer, cases):
    prompt = cases["text_only_chat"][0]
    params = dict(max_tokens=10, temperature=1.0, top_p=0.95, seed=77)

    async def main(company: int, n: int = 3, seed: int = 77):
        engine = make_engine(model, tokenizer)
        others = [
            engine.add_request(cases[name][0], SamplingParams(max_tokens=6, temperature=1.0), f"o{i}")
            for i, name in enumerate(CASES[:company])
        ]
        target = engine.add_request(prompt, SamplingParams(**{**params, "seed": seed}, n=n), "t")
        results = await asyncio.gather(collect(target), *(collect(o) for o in others))
        await engine.shutdown()
        return by_choice(results[0][2])

    alone, crowded = run(main(0)), run(main(3))
    assert alone == crowded
    assert len({tuple(ids) for ids in alone.values()}) > 1, "choices are sampled independently"
    for i in range(3):
        assert run(main(0, n=1, seed=77 + i))[0] == alone[i]


def test_aborting_an_n_request_aborts_every_choice(model, tokenizer, cases):
    async def main():
        engine = make_engine(model, tokenizer)
        params = SamplingParams(max_tokens=200, ignore_eos=True, n=3, **GREEDY)
        stream = engine.add_request(cases["text_only_chat"][0], params, "r")
        seen = set()
        while len(seen) < 3:  # every choice is running
            seen.add((await anext(stream)).index)
        engine.abort("r")
        rest = [out async for out in stream]
        finals = sorted(out.index for out in rest if out.finished)
        assert finals == [0, 1, 2] and all(out.finish_reason == "abort" for out in rest if out.finished)
        assert engine.get_stats().num_running == 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

        cancelled = engine.add_request(cases["text_only_chat"][0], params, "c")
        await anext(cancelled)
        await cancelled.aclose()
        for _ in range(100):
            if engine.get_stats().num_running == engine.get_stats().num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.get_stats()
        await engine.shutdown()
        return stats

    stats = run(main())
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_logprobs_through_the_engine(model, tokenizer, cases):
    prompt, golden, _ = cases["text_only_chat"]

    async def main():
        engine = make_engine(model, tokenizer)
        greedy = engine.add_request(
            prompt, SamplingParams(max_tokens=12, logprobs=True, top_logprobs=4, **GREEDY), "g"
        )
        sampled = engine.add_request(
            prompt, SamplingParams(max_tokens=12, logprobs=True, temperature=0.8, seed=3), "s"
        )
        plain = engine.add_request(prompt, SamplingParams(max_tokens=12, **GREEDY), "p")
        results = await asyncio.gather(collect(greedy), collect(sampled), collect(plain))
        await engine.shutdown()
        return results

    (g_ids, _, g_out), (s_ids, _, s_out), (p_ids, _, p_out) = run(main())
    assert g_ids == p_ids == golden
    assert all(out.new_logprobs is None for out in p_out)
    g_lps = [lp for out in g_out for lp in out.new_logprobs]
    assert [lp.token_id for lp in g_lps] == g_ids
    for lp in g_lps:
        assert len(lp.top_logprobs) == 4 and lp.logprob == max(t.logprob for t in lp.top_logprobs)
        assert lp.token == tokenizer.decode([lp.token_id], skip_special_tokens=False)
        assert all(t.token_bytes == t.token.encode() for t in lp.top_logprobs if "\ufffd" not in t.token)
    entry = g_lps[0].as_openai()
    assert entry["token"] == g_lps[0].token and entry["bytes"] == list(g_lps[0].token_bytes)
    assert [t["logprob"] for t in entry["top_logprobs"]] == [t.logprob for t in g_lps[0].top_logprobs]
    s_lps = [lp for out in s_out for lp in out.new_logprobs]
    assert [lp.token_id for lp in s_lps] == s_ids
    assert all(lp.top_logprobs == () and lp.logprob <= 0.0 and math.isfinite(lp.logprob) for lp in s_lps)


def test_openai_penalties_min_p_and_logit_bias_leave_golden_company_unchanged(model, tokenizer, cases):
    prompt = cases["text_only_chat"][0]
    banned = cases["text_only_chat"][1][0]  # the golden first token

    async def main():
        engine = make_engine(model, tokenizer)
        goldens = [
            engine.add_request(cases[name][0], SamplingParams(max_tokens=12, **GREEDY), name)
            for name in CASES
        ]
        special = [
            engine.add_request(
                prompt, SamplingParams(max_tokens=12, frequency_penalty=2.0, **GREEDY), "freq"
            ),
            engine.add_request(prompt, SamplingParams(max_tokens=12, presence_penalty=2.0, **GREEDY), "pres"),
            engine.add_request(
                prompt, SamplingParams(max_tokens=12, min_p=0.5, temperature=1.0, seed=1), "minp"
            ),
            engine.add_request(
                prompt, SamplingParams(max_tokens=12, logit_bias={banned: -100}, **GREEDY), "ban"
            ),
        ]
        results = await asyncio.gather(*(collect(s) for s in goldens + special))
        await engine.shutdown()
        return results

    results = run(main())
    for name, (ids, _, _) in zip(CASES, results[: len(CASES)], strict=True):
        assert ids == cases[name][1], name
    freq, pres, _, ban = (r[0] for r in results[len(CASES) :])
    assert banned not in ban
    golden = cases["text_only_chat"][1]
    if len(set(golden)) < len(golden):  # the golden answer repeats a token: the penalties must change it
        assert freq != golden and pres != golden


def test_bad_sampling_params_raise_before_the_first_await(model, tokenizer, cases):
    engine = make_engine(model, tokenizer, max_waiting=4)
    prompt = cases["text_only_chat"][0]
    vocab = engine.model_config.vocab_size
    bad = [
        dict(logit_bias={vocab: 1.0}),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={3: 101.0}),
        dict(stop_token_ids=(vocab + 5,)),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=float("nan")),
        dict(min_p=1.5),
        dict(top_logprobs=3),  # without logprobs
        dict(logprobs=True, top_logprobs=21),
        dict(n=0),
        dict(n=9),
    ]
    for i, params in enumerate(bad):
        with pytest.raises(InvalidRequestError):
            engine.add_request(prompt, SamplingParams(**params), f"bad{i}")
    with pytest.raises(InvalidRequestError):
        engine.add_request(prompt, SamplingParams(logit_bias={"one": 1.0}), "bad-key")
    assert SamplingParams(logit_bias={"5": -100, 7: 2.5}).logit_bias == (
        (5, -100),
        (7, 2.5),
    )  # OpenAI's JSON keys
    engine.add_request(prompt, SamplingParams(max_tokens=4, n=3), "three")
    with pytest.raises(InvalidRequestError):
        engine.add_request(prompt, SamplingParams(max_tokens=4), "three")  # the group's id is taken
    with pytest.raises(OverloadedError):
        engine.add_request(prompt, SamplingParams(max_tokens=4, n=2), "over")  # 3 + 2 > max_waiting
