"""Scheduler: the choices of an n > 1 request wait for choice 0's prefill, then adopt its blocks."""

from __future__ import annotations

from tests.unit.engine.conftest import make_request, make_scheduler, sample_all


def choices(n: int, num_prompt_tokens: int):
    leader = make_request("r#0", num_prompt_tokens)
    rest = [make_request(f"r#{i}", num_prompt_tokens) for i in range(1, n)]
    for request in rest:
        request.prefill_leader = leader
    return [leader, *rest]


def test_choices_wait_for_the_leader_prefill_then_hit_the_prefix_cache():
    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=32)
    scheduler.block_manager.enable_prefix_caching = True
    requests = choices(3, 18)  # 18 tokens: 4 full blocks
    for request in requests:
        scheduler.add_request(request)
    out = scheduler.schedule()  # budget is left, but the choices wait for the leader's prompt
    assert [(item.request.request_id, item.num_new_tokens) for item in out.scheduled] == [("r#0", 18)]
    scheduler.update_from_output(out, sample_all(out))
    out = scheduler.schedule()
    scheduled = {item.request.request_id: item for item in out.scheduled}
    assert set(scheduled) == {"r#0", "r#1", "r#2"}
    for rid in ("r#1", "r#2"):  # 4 full blocks adopted: only the last 2 prompt tokens run
        assert scheduled[rid].num_computed_tokens == 16 and scheduled[rid].num_new_tokens == 2
        assert scheduled[rid].block_table[:4] == scheduled["r#0"].block_table[:4]
        assert scheduled[rid].request.prefill_leader is None
    assert scheduler.num_cached_prompt_tokens == 32


def test_a_finished_leader_releases_its_choices_and_a_preempted_leader_does_not_deadlock():
    scheduler = make_scheduler(num_blocks=64, block_size=4)
    requests = choices(2, 10)
    for request in requests:
        scheduler.add_request(request)
    scheduler.finish_request("r#0", "abort")
    out = scheduler.schedule()
    assert [item.request.request_id for item in out.scheduled] == ["r#1"]

    scheduler = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=4)
    leader, child = choices(2, 10)
    scheduler.add_request(leader)
    scheduler.add_request(child)
    scheduler.update_from_output(out := scheduler.schedule(), sample_all(out))
    scheduler._preempt(leader)  # back at the head of the queue, ahead of its choice
    assert list(scheduler.waiting) == [leader, child]
    for _ in range(6):
        scheduler.update_from_output(out := scheduler.schedule(), sample_all(out))
    assert child.num_computed_tokens > 0 and leader.num_output_tokens > 0
