"""Scheduler policy, driven with hand-built runner outputs (no model, no tensors)."""

from __future__ import annotations

from cogvlm_ray.engine.request import RequestStatus
from tests.unit.engine.conftest import EOS, make_request, make_scheduler, sample_all


def step(scheduler, token_id: int = 7):
    out = scheduler.schedule()
    updates = scheduler.update_from_output(out, sample_all(out, token_id))
    return out, updates


def test_prefill_then_decode_counts_tokens():
    scheduler = make_scheduler()
    request = make_request("a", 10, max_tokens=3)
    scheduler.add_request(request)
    out, updates = step(scheduler)
    assert [(s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled] == [(0, 10)]
    assert out.num_prefill_tokens == 10 and out.num_decode_tokens == 0
    assert request.num_computed_tokens == 10 and request.output_token_ids == [7]
    out, _ = step(scheduler)
    assert [(s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled] == [(10, 1)]
    assert out.num_decode_tokens == 1
    _, updates = step(scheduler)
    assert updates[0].finished and request.finish_reason == "length"
    assert not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_new_requests_join_between_decode_steps():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 5, max_tokens=10))
    step(scheduler)
    step(scheduler)
    scheduler.add_request(make_request("b", 6, max_tokens=10))
    out, updates = step(scheduler)
    assert {s.request.request_id: s.num_new_tokens for s in out.scheduled} == {"a": 1, "b": 6}
    assert {u.request.request_id for u in updates} == {"a", "b"}


def test_chunked_prefill_shares_the_budget_with_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    for rid in ("a", "b"):
        scheduler.add_request(make_request(rid, 3, max_tokens=50))
    step(scheduler)  # both prefilled (6 tokens)
    long_request = make_request("long", 20, max_tokens=5)
    scheduler.add_request(long_request)
    chunks = []
    while long_request.num_output_tokens == 0:
        out, _ = step(scheduler)
        by_id = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
        assert by_id["a"] == by_id["b"] == 1, "running streams decode every step"
        assert out.num_scheduled_tokens <= 8
        chunks.append(by_id["long"])
    assert chunks == [6, 6, 6, 2]
    assert long_request.num_computed_tokens == 20


def test_without_chunking_a_prefill_waits_for_room():
    scheduler = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4, enable_chunked_prefill=False)
    scheduler.add_request(make_request("a", 3, max_tokens=50))
    step(scheduler)
    scheduler.add_request(make_request("long", 20, max_tokens=5))
    out, _ = step(scheduler)
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    # Alone in the queue with nothing running, an over-budget prompt still runs whole.
    solo = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    solo.add_request(make_request("long", 20, max_tokens=5))
    out, _ = step(solo)
    assert [s.num_new_tokens for s in out.scheduled] == [20]


def test_max_num_seqs_bounds_the_batch():
    scheduler = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        scheduler.add_request(make_request(rid, 4))
    out, _ = step(scheduler)
    assert len(out.scheduled) == 2 and scheduler.num_waiting == 1


def test_full_kv_cache_queues_and_reports_the_wait():
    # 4 blocks x 4 tokens = 16 tokens: a 12-token prompt fills 3 blocks, the second cannot fit.
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    first, second = make_request("a", 12, max_tokens=2), make_request("b", 12, max_tokens=2)
    scheduler.add_request(first)
    scheduler.add_request(second)
    out, _ = step(scheduler)
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    assert second.status is RequestStatus.WAITING and scheduler.num_waiting_for_kv == 1
    step(scheduler)  # first finishes (max_tokens=2) and frees its blocks
    assert first.is_finished
    out, _ = step(scheduler)
    assert [s.request.request_id for s in out.scheduled] == ["b"]
    assert scheduler.num_waiting_for_kv == 0


def test_decode_without_free_block_preempts_the_newest_and_recomputes_it():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    old, new = make_request("old", 4, max_tokens=8), make_request("new", 8, max_tokens=8)
    scheduler.add_request(old)
    scheduler.add_request(new)
    step(scheduler)  # prefill: old holds 1 block, new 2, one block left
    assert scheduler.block_manager.num_free_blocks == 1
    step(scheduler)  # old's token 5 takes the last block; new's token 9 needs a 3rd: new is preempted
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert scheduler.waiting[0] is new
    generated_before = list(new.output_token_ids)
    while not old.is_finished:
        step(scheduler)
    out, _ = step(scheduler)
    # Recompute covers the prompt and the tokens generated before preemption, then samples again.
    assert out.scheduled[0].request is new
    assert out.scheduled[0].num_new_tokens == 8 + len(generated_before)
    assert new.output_token_ids[: len(generated_before)] == generated_before


def test_finish_request_frees_blocks_immediately():
    scheduler = make_scheduler(num_blocks=8, block_size=4)
    running, waiting = make_request("a", 10), make_request("b", 30)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 5
    scheduler.finish_request("a", "abort")
    assert scheduler.block_manager.num_free_blocks == 8 and running.finish_reason == "abort"
    scheduler.finish_request("b", "abort")
    assert not scheduler.has_unfinished_requests()
    assert scheduler.finish_request("missing", "abort") is None


def test_token_stops_eos_stop_ids_min_tokens_ignore_eos():
    def run(token_id: int, **params) -> tuple[str | None, int]:
        scheduler = make_scheduler()
        request = make_request("r", 4, **params)
        scheduler.add_request(request)
        while not request.is_finished:
            step(scheduler, token_id)
        return request.finish_reason, request.num_output_tokens

    assert run(EOS) == ("stop", 1)
    assert run(EOS, ignore_eos=True, max_tokens=4) == ("length", 4)
    assert run(42, stop_token_ids=(42,)) == ("stop", 1)
    assert run(EOS, min_tokens=3) == ("stop", 3)
    assert run(7, max_tokens=5) == ("length", 5)


def test_context_window_finishes_with_length():
    scheduler = make_scheduler(max_model_len=12)
    request = make_request("r", 10, max_tokens=100)
    scheduler.add_request(request)
    while not request.is_finished:
        step(scheduler)
    assert request.finish_reason == "length" and request.num_tokens == 12


def test_prefix_cache_admits_a_repeated_prompt_past_its_cached_blocks():
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    scheduler.block_manager.enable_prefix_caching = True
    first = make_request("a", 10, max_tokens=2)
    scheduler.add_request(first)
    while not first.is_finished:
        step(scheduler)
    again = make_request("b", 10, max_tokens=2)
    scheduler.add_request(again)
    out, _ = step(scheduler)
    # Two full blocks (8 tokens) come from the cache; only the last 2 prompt tokens run.
    assert [(s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled] == [(8, 2)]
    assert again.num_cached_prompt_tokens == 8 and scheduler.num_cached_prompt_tokens == 8
    exact = make_request("c", 8, max_tokens=2)  # fully cached prompt: the last block is recomputed
    scheduler.add_request(exact)
    out, _ = step(scheduler)
    assert {s.request.request_id: (s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled}["c"] == (
        4,
        4,
    )


def test_scheduler_and_runner_outputs_are_plain_data():
    """The worker thread gets a step fixed at schedule time and hands back values, not writes."""
    import dataclasses

    from cogvlm_ray.engine.scheduler import RunnerOutput, ScheduledRequest

    assert dataclasses.fields(ScheduledRequest) and ScheduledRequest.__dataclass_params__.frozen
    assert RunnerOutput.__dataclass_params__.frozen
    assert {f.name for f in dataclasses.fields(RunnerOutput)} == {
        "sampled_token_ids",
        "image_cache_hits",
        "logprobs",
    }
