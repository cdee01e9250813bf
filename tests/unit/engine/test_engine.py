"""Engine end to end on the golden tiny CogVLM2 (CPU, float32): batching, caching, abort, stops.

Continuous batching must not change greedy answers, so every comparison here is exact.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.engine import Engine, EngineConfig, SamplingParams
from cogvlm_ray.errors import (
    EngineDeadError,
    InvalidRequestError,
    OverloadedError,
    PromptTooLongError,
    ServiceUnavailableError,
)
from cogvlm_ray.model import load_model
from cogvlm_ray.model.pixels import normalize_image
from tests.unit.engine.fixture_prompts import CASES, load_case, text_prompt

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return {name: load_case(fixture_dir, name) for name in CASES}


def make_engine(model, tokenizer, **config) -> Engine:
    return Engine(model, tokenizer, EngineConfig(**{"max_kv_tokens": 2048, "block_size": 4, **config}))


async def collect(stream) -> tuple[list[int], str, list]:
    outputs = [out async for out in stream]
    ids = [t for out in outputs for t in out.new_token_ids]
    return ids, "".join(out.new_text for out in outputs), outputs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_fixture_images_match_the_official_pixels(cases):
    for prompt, _, pixels in cases.values():
        if prompt.image is not None:
            torch.testing.assert_close(
                normalize_image(prompt.image), torch.from_numpy(pixels), atol=1e-6, rtol=0
            )


def test_greedy_batch_matches_the_official_tokens(model, tokenizer, cases):
    async def main():
        engine = make_engine(model, tokenizer, max_images_per_step=3)  # all three images in step 1
        params = SamplingParams(max_tokens=12, **GREEDY)
        streams = [engine.add_request(cases[name][0], params, name) for name in CASES]
        results = await asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown()
        return engine, results

    engine, results = run(main())
    for name, (ids, text, outputs) in zip(CASES, results, strict=True):
        assert ids == cases[name][1], name
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert outputs[-1].finish_reason == "length"
        assert all(o.finish_reason is None for o in outputs[:-1])
        assert outputs[-1].num_generated_tokens == 12
        assert outputs[-1].num_prompt_tokens == len(cases[name][0].input_ids)
    stats = engine.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0
    assert stats.total_generated_tokens == 12 * len(CASES)  # every sampled token, the last ones included
    # Four image cases, three distinct images, all in the first step: the two chats about
    # img_rgb_odd share one tower row, so three lookups (all misses) and one batched tower call.
    assert (stats.image_cache_queries, stats.image_cache_hits) == (3, 0)
    assert [o[-1].image_cache_hit for _, _, o in results] == [False, False, False, True, None]


def _workload(cases, tokenizer):
    """Image and text requests of different lengths and output budgets."""
    story = tokenizer.encode("Once upon a time, a curious cat named Pepper lived in a quiet house.")
    return [
        ("history", cases["chat_history_image"][0], 20),
        ("text", cases["text_only_chat"][0], 7),
        ("vqa", cases["vqa_image"][0], 15),
        ("story", text_prompt(story), 25),
        ("base", cases["base_image"][0], 3),
        ("chat", cases["chat_image"][0], 11),
    ]


@pytest.fixture(scope="module")
def one_at_a_time(model, tokenizer, cases):
    """Reference: each workload request alone, no caches."""

    async def main():
        engine = make_engine(model, tokenizer, image_cache_bytes=0, enable_prefix_caching=False)
        out = {}
        for rid, prompt, max_tokens in _workload(cases, tokenizer):
            stream = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), rid)
            out[rid] = (await collect(stream))[0]
        await engine.shutdown()
        return out

    return run(main())


@pytest.mark.parametrize(
    "config",
    [
        # Chunks of at most 16 tokens: long prompts are prefilled over several steps.
        dict(max_num_batched_tokens=16, max_num_seqs=4),
        # Chunks of 1-5 tokens: the 6-position image spans are split across steps.
        dict(max_num_batched_tokens=5, max_num_seqs=3),
        dict(max_num_batched_tokens=64, max_num_seqs=4, enable_chunked_prefill=False),
    ],
    ids=["chunk16", "chunk5-splits-images", "no-chunking"],
)
def test_continuous_batching_equals_one_at_a_time(model, tokenizer, cases, one_at_a_time, config):
    workload = _workload(cases, tokenizer)

    async def staggered():
        # New requests arrive while earlier ones are mid-decode (after the previous one's 2nd delta).
        engine = make_engine(model, tokenizer, **config)
        tasks = {}
        for rid, prompt, max_tokens in workload:
            stream = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), rid)
            first_two = [await anext(stream), await anext(stream)] if max_tokens >= 2 else []

            async def rest(stream=stream, head=first_two):
                ids, _, _ = await collect(stream)
                return [t for o in head for t in o.new_token_ids] + ids

            tasks[rid] = asyncio.ensure_future(rest())
        out = {rid: await task for rid, task in tasks.items()}
        stats = engine.get_stats()
        await engine.shutdown()
        return out, stats

    batched, stats = run(staggered())
    assert batched == one_at_a_time
    assert stats.num_steps < sum(len(v) for v in one_at_a_time.values()), "requests really shared steps"
    assert one_at_a_time["chat"] == cases["chat_image"][1][:11]


def test_same_seed_same_output_regardless_of_batch_company(model, tokenizer, cases):
    sampled = SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.9, top_k=100, repetition_penalty=1.1, seed=1234
    )

    async def main(company: int):
        engine = make_engine(model, tokenizer)
        others = [
            engine.add_request(
                cases[name][0], SamplingParams(max_tokens=5 + i, temperature=1.0, seed=i), f"o{i}"
            )
            for i, name in enumerate(CASES[:company])
        ]
        target = engine.add_request(cases["chat_image"][0], sampled, "target")
        results = await asyncio.gather(collect(target), *(collect(o) for o in others))
        await engine.shutdown()
        return results[0][0]

    alone, crowded, full = run(main(0)), run(main(2)), run(main(5))
    assert alone == crowded == full
    unseeded = SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.9, top_k=100, repetition_penalty=1.1, seed=99
    )

    async def other_seed():
        engine = make_engine(model, tokenizer)
        ids = (await collect(engine.add_request(cases["chat_image"][0], unseeded, "x")))[0]
        await engine.shutdown()
        return ids

    assert run(other_seed()) != alone


def test_image_cache_hit_skips_the_tower_and_equals_the_miss(model, tokenizer, cases):
    calls = []
    logits: list[torch.Tensor] = []
    original_encode, original_logits = model.encode_images, model.compute_logits

    def counting(pixel_values):
        calls.append(pixel_values.shape[0])
        return original_encode(pixel_values)

    def recording(hidden):
        logits.append(original_logits(hidden))
        return logits[-1]

    async def main():
        # Prefix caching off: here the image-feature cache alone must skip the tower.
        engine = make_engine(model, tokenizer, enable_prefix_caching=False)
        model.encode_images, model.compute_logits = counting, recording  # shadow until deleted
        try:
            params = SamplingParams(max_tokens=12, **GREEDY)
            miss = await collect(engine.add_request(cases["chat_image"][0], params, "miss"))
            hit = await collect(engine.add_request(cases["chat_image"][0], params, "hit"))
            # Multi-turn about the same picture: same pixels, same hash, no tower run either.
            history = await collect(engine.add_request(cases["chat_history_image"][0], params, "history"))
        finally:
            del model.encode_images, model.compute_logits
        stats = engine.get_stats()
        await engine.shutdown()
        return miss, hit, history, stats

    miss, hit, history, stats = run(main())
    assert calls == [1]
    # Bit-identical: every step's logits of the hit equal the miss's exactly.
    assert len(logits) == 36 and all(
        torch.equal(a, b) for a, b in zip(logits[:12], logits[12:24], strict=True)
    )
    assert miss[0] == hit[0] == cases["chat_image"][1]
    assert history[0] == cases["chat_history_image"][1]
    assert miss[2][-1].image_cache_hit is False and hit[2][-1].image_cache_hit is True
    assert history[2][-1].image_cache_hit is True
    assert (stats.image_cache_hits, stats.image_cache_queries) == (2, 3) and stats.image_cache_bytes > 0


def test_prefix_cache_reuses_the_image_prefix_kv(model, tokenizer, cases):
    calls = []
    original = model.encode_images

    def counting(pixel_values):
        calls.append(pixel_values.shape[0])
        return original(pixel_values)

    chat, golden, _ = cases["chat_image"]
    other_image = cases["vqa_image"][0]
    same_text_other_image = type(chat)(
        chat.input_ids, chat.token_type_ids, other_image.image, other_image.image_hash
    )

    async def main():
        engine = make_engine(model, tokenizer)  # block_size 4
        params = SamplingParams(max_tokens=12, **GREEDY)
        model.encode_images = counting
        try:
            first = await collect(engine.add_request(chat, params, "first"))
            again = await collect(engine.add_request(chat, params, "again"))
            hit_tokens = engine.get_stats().prefix_cache_hit_tokens
            history = await collect(engine.add_request(cases["chat_history_image"][0], params, "history"))
            history_hits = engine.get_stats().prefix_cache_hit_tokens - hit_tokens
            other = await collect(engine.add_request(same_text_other_image, params, "other"))
        finally:
            del model.encode_images
        stats = engine.get_stats()
        await engine.shutdown()
        return first, again, hit_tokens, history, history_hits, other, stats

    first, again, hit_tokens, history, history_hits, other, stats = run(main())
    assert first[0] == again[0] == golden
    assert hit_tokens == 20, "22-token prompt: its 5 full blocks of 4 are reused, the rest is computed"
    assert again[2][-1].image_cache_hit is True
    assert (
        history[0] == cases["chat_history_image"][1] and history_hits >= 8 and history[2][-1].image_cache_hit
    )
    # Same ids, other pixels: the image blocks' keys differ, so nothing is reused and the tower runs.
    assert calls == [1, 1] and other[2][-1].image_cache_hit is False
    assert stats.prefix_cache_hit_tokens == hit_tokens + history_hits and stats.kv_cache_usage == 0.0


def test_abort_and_cancelled_consumer_free_slot_and_kv(model, tokenizer, cases):
    async def main():
        engine = make_engine(model, tokenizer)
        params = SamplingParams(max_tokens=200, ignore_eos=True, **GREEDY)
        aborted = engine.add_request(cases["chat_image"][0], params, "aborted")
        first = await anext(aborted)
        assert engine.get_stats().kv_cache_usage > 0 and engine.get_stats().num_running == 1
        engine.abort("aborted")
        rest = [o async for o in aborted]
        assert rest[-1].finish_reason == "abort" and first.finish_reason is None
        assert (
            engine.get_stats().num_running == 0
            and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        )

        cancelled = engine.add_request(cases["text_only_chat"][0], params, "cancelled")
        await anext(cancelled)
        await cancelled.aclose()  # the consumer went away (client disconnect)
        for _ in range(100):
            if engine.get_stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.get_stats()
        await engine.shutdown()
        return stats

    stats = run(main())
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0


def test_full_kv_cache_queues_instead_of_failing(model, tokenizer, cases):
    prompt, golden, _ = cases["chat_history_image"]  # 69 tokens + 12 = 81: 21 blocks of 4

    async def main():
        # Room for one such request at a time (prefix sharing off: every request needs its own blocks).
        engine = make_engine(model, tokenizer, max_kv_tokens=96, enable_prefix_caching=False)
        params = SamplingParams(max_tokens=12, **GREEDY)
        streams = [engine.add_request(prompt, params, f"r{i}") for i in range(3)]
        waited = []

        async def watch():
            while True:
                waited.append(engine.get_stats().num_waiting_for_kv)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(collect(s) for s in streams))
        watcher.cancel()
        await engine.shutdown()
        return results, waited

    results, waited = run(main())
    assert all(ids == golden for ids, _, _ in results)
    assert max(waited) >= 1


def test_kv_pressure_with_shared_prefixes_preempts_and_recomputes_exactly(model, tokenizer, cases):
    prompt, golden, _ = cases["chat_history_image"]

    async def main():
        # 24 blocks of 4: three requests share 17 prompt blocks but their decodes outgrow the rest.
        engine = make_engine(model, tokenizer, max_kv_tokens=96)
        params = SamplingParams(max_tokens=12, **GREEDY)
        first = engine.add_request(prompt, params, "r0")
        head = await anext(first)  # r0's prompt blocks are computed and cached
        others = [engine.add_request(prompt, params, f"r{i}") for i in (1, 2)]
        results = await asyncio.gather(collect(first), *(collect(s) for s in others))
        preemptions = engine.scheduler.num_preemptions
        stats = engine.get_stats()
        await engine.shutdown()
        return head.new_token_ids + results[0][0], [r[0] for r in results[1:]], preemptions, stats

    first_ids, other_ids, preemptions, stats = run(main())
    assert first_ids == golden and all(ids == golden for ids in other_ids)
    assert preemptions >= 1 and stats.prefix_cache_hit_tokens >= 2 * 68
    assert stats.kv_cache_usage == 0.0


def test_stop_string_across_tokens_is_cut_and_never_streamed(model, tokenizer, cases):
    prompt = cases["chat_image"][0]

    async def generate(**extra):
        engine = make_engine(model, tokenizer)
        result = await collect(
            engine.add_request(prompt, SamplingParams(max_tokens=12, **GREEDY, **extra), "r")
        )
        await engine.shutdown()
        return result

    ids, text, _ = run(generate())
    # A stop string that starts inside one token's text and ends inside a later token's.
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    boundary = next(i for i in range(2, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    start = len(pieces[boundary - 1]) - 1
    stop = text[start : start + 3]
    cut = text.index(stop)
    _, stopped_text, outputs = run(generate(stop=(stop,)))
    assert stopped_text == text[:cut]
    assert outputs[-1].finish_reason == "stop"
    assert all(stop not in "".join(o.new_text for o in outputs[: i + 1]) for i in range(len(outputs)))


def test_min_tokens_and_eos(model, tokenizer, cases):
    prompt, golden, _ = cases["text_only_chat"]
    first = golden[0]

    async def main(**params):
        engine = make_engine(model, tokenizer)
        result = await collect(
            engine.add_request(prompt, SamplingParams(max_tokens=12, **GREEDY, **params), "r")
        )
        await engine.shutdown()
        return result

    ids, text, outputs = run(main(stop_token_ids=(first,)))
    assert ids == [first] and text == "" and outputs[-1].finish_reason == "stop"
    ids, _, _ = run(main(stop_token_ids=(first,), min_tokens=3))
    assert ids[0] != first and len(ids) >= 3


def test_bad_requests_raise_before_the_first_await(model, tokenizer, cases):
    engine = make_engine(model, tokenizer, max_waiting=1, max_model_len=80)
    prompt = cases["text_only_chat"][0]
    with pytest.raises(InvalidRequestError):
        engine.add_request(prompt, SamplingParams(n=9), "a")  # max_n is 8
    with pytest.raises(PromptTooLongError):
        engine.add_request(cases["chat_history_image"][0], SamplingParams(max_tokens=20), "b")
    with pytest.raises(InvalidRequestError):
        engine.add_request(text_prompt([1, 2, 10_000]), SamplingParams(), "c")
    image_prompt = cases["chat_image"][0]
    without_image = type(image_prompt)(image_prompt.input_ids, image_prompt.token_type_ids, None, None)
    with pytest.raises(InvalidRequestError):
        engine.add_request(without_image, SamplingParams(), "d")
    engine.add_request(prompt, SamplingParams(max_tokens=4), "queued")
    with pytest.raises(OverloadedError):
        engine.add_request(prompt, SamplingParams(max_tokens=4), "over")
    with pytest.raises(InvalidRequestError):
        engine.add_request(prompt, SamplingParams(max_tokens=4), "queued")


def test_forward_runs_off_the_event_loop_and_a_dead_loop_is_reported(model, tokenizer, cases):
    async def main():
        engine = make_engine(model, tokenizer)
        threads = set()
        execute = engine.runner.execute

        def spy(out):
            threads.add(threading.get_ident())
            return execute(out)

        engine.runner.execute = spy
        await collect(
            engine.add_request(cases["text_only_chat"][0], SamplingParams(max_tokens=3, **GREEDY), "a")
        )
        assert threads and threading.get_ident() not in threads

        def broken(out):
            raise RuntimeError("device lost")

        engine.runner.execute = broken
        with pytest.raises(EngineDeadError):
            await collect(engine.add_request(cases["text_only_chat"][0], SamplingParams(max_tokens=3), "b"))
        with pytest.raises(EngineDeadError):
            engine.check_health()
        assert engine.get_stats().is_alive is False
        await engine.shutdown(timeout_s=0.1)

    run(main())


def test_shutdown_finishes_running_requests_then_refuses_new_ones(model, tokenizer, cases):
    prompt = cases["text_only_chat"][0]

    async def main():
        engine = make_engine(model, tokenizer)
        running = engine.add_request(prompt, SamplingParams(max_tokens=6, **GREEDY), "running")
        head = await anext(running)
        never_started = make_engine(model, tokenizer)
        orphan = never_started.add_request(prompt, SamplingParams(max_tokens=6, **GREEDY), "orphan")
        await asyncio.gather(engine.shutdown(timeout_s=30), never_started.shutdown(timeout_s=0))
        rest = [o async for o in running]
        with pytest.raises(ServiceUnavailableError):
            engine.add_request(prompt, SamplingParams(), "late")
        orphaned = [o async for o in orphan]
        return head, rest, orphaned

    head, rest, orphaned = run(main())
    assert rest[-1].finish_reason == "length" and rest[-1].num_generated_tokens == 6
    assert head.finish_reason is None
    assert [o.finish_reason for o in orphaned] == ["abort"]


def test_runner_returns_image_cache_hits_and_leaves_request_state_alone(model, tokenizer, cases):
    """The worker thread reports what it saw; only the event loop writes it onto the request."""
    engine = make_engine(model, tokenizer)
    prompt = cases["chat_image"][0]
    engine.add_request(prompt, SamplingParams(max_tokens=2, **GREEDY), "first")
    request = engine.scheduler.requests["first"]
    out = engine.runner.execute(engine.scheduler.schedule())
    assert out.image_cache_hits == {"first": False} and request.image_cache_hit is None
    engine._record_image_cache_hits(out)
    assert request.image_cache_hit is False
    engine._record_image_cache_hits(type(out)(image_cache_hits={"first": True}))
    assert request.image_cache_hit is False  # the first observation counts
