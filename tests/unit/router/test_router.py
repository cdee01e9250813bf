"""`ImageAffinityRouter` inside Serve's real routing loop, with fake replicas (no Ray cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from ray.exceptions import ActorDiedError
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from cogvlm_ray.serve import metrics as m
from cogvlm_ray.serve.affinity import AFFINITY_KWARG, rendezvous_rank
from cogvlm_ray.serve.router import ImageAffinityRouter

DEPLOYMENT = DeploymentID(name="ModelServer", app_name="app")


class FakeReplica:
    """What the router reads from a `RunningReplica`: identity, capacity, and a queue-length RPC."""

    def __init__(self, unique_id: str, queue_len: int = 0, max_ongoing: int = 4):
        self.replica_id = ReplicaID(unique_id, DEPLOYMENT)
        self.queue_len = queue_len
        self.max_ongoing_requests = max_ongoing
        self.is_dead = False
        self.num_probes = 0
        self.node_id = "node-1"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.routing_stats: dict = {}
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.num_probes += 1
        if self.is_dead:
            raise ActorDiedError()
        return self.queue_len


def make_router(
    loop: asyncio.AbstractEventLoop, replicas: list[FakeReplica], **kwargs
) -> ImageAffinityRouter:
    router = ImageAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN,
                                 use_replica_queue_len_cache=True)  # fmt: skip
    router.initialize_state(**kwargs)
    router._metrics = m.Metrics()  # private registry instead of the process-wide one
    router._lazily_fetched_loop = loop  # Serve binds the router to the caller's running loop
    router.update_replicas(replicas)  # type: ignore[arg-type]
    return router


def request(key: str | None, request_id: str) -> PendingRequest:
    kwargs = {AFFINITY_KWARG: key} if key is not None else {}
    return PendingRequest(args=["prepared", "params", request_id], kwargs=kwargs,
                          metadata=RequestMetadata(request_id=request_id, internal_request_id=request_id))  # fmt: skip


def ids(ranks) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def home_of(key: str, replicas: list[FakeReplica]) -> str:
    return rendezvous_rank(key, [r.replica_id.unique_id for r in replicas])[0]


def decisions(router: ImageAffinityRouter) -> dict[tuple[str, str], float]:
    counter = router._metrics._prom[m.ROUTING_DECISIONS.name]  # type: ignore[union-attr]
    return {(s.labels["outcome"], s.labels["reason"]): s.value
            for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")}  # fmt: skip


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


def route(loop: asyncio.AbstractEventLoop, router: ImageAffinityRouter, pending: PendingRequest) -> str:
    """The replica Serve's routing loop (ranks, queue-length checks, retries) picks."""
    replica = loop.run_until_complete(asyncio.wait_for(router._choose_replica_for_request(pending), 10))
    return replica.replica_id.unique_id


def test_image_requests_go_home_and_follow_ups_stay(loop):
    replicas = [FakeReplica(f"replica-{i}") for i in range(3)]
    router = make_router(loop, replicas)
    chosen = {}
    for image in range(12):
        key = f"image-{image}"
        picks = {route(loop, router, request(key, f"{key}-turn-{turn}")) for turn in range(4)}
        assert picks == {home_of(key, replicas)}
        chosen[key] = picks.pop()
    assert len(set(chosen.values())) > 1, "different images spread over replicas"
    assert decisions(router) == {("affinity", "home"): 48}


def test_home_is_ranked_first_with_the_default_policy_behind_it(loop):
    replicas = [FakeReplica(f"replica-{i}") for i in range(4)]
    router = make_router(loop, replicas)
    ranks = ids(loop.run_until_complete(router.choose_replicas(router._replicas_list, request("k", "r1"))))
    assert ranks[0] == [home_of("k", replicas)]
    assert len(ranks) == 2 and len(ranks[1]) == 2, "power-of-two fallback rank appended"


def test_text_only_keeps_power_of_two(loop):
    replicas = [FakeReplica(f"replica-{i}") for i in range(4)]
    router = make_router(loop, replicas)
    seen = set()
    for i in range(40):
        ranks = ids(
            loop.run_until_complete(router.choose_replicas(router._replicas_list, request(None, f"t{i}")))
        )
        assert len(ranks) == 1 and len(ranks[0]) == 2 and len(set(ranks[0])) == 2
        seen.update(ranks[0])
    assert seen == {r.replica_id.unique_id for r in replicas}
    assert decisions(router) == {("default", "text_only"): 40}


def test_overloaded_home_falls_back(loop):
    replicas = [FakeReplica("replica-0"), FakeReplica("replica-1")]
    home = home_of("k", replicas)
    for r in replicas:
        r.queue_len = 3 if r.replica_id.unique_id == home else 0
    router = make_router(loop, replicas, max_load_imbalance=2, max_affinity_candidates=1)
    assert route(loop, router, request("k", "r1")) != home
    assert decisions(router) == {("fallback", "overloaded"): 1}
    # Within the bound it goes home again.
    router = make_router(loop, replicas, max_load_imbalance=3, max_affinity_candidates=1)
    assert route(loop, router, request("k", "r2")) == home


def test_burst_for_one_image_spills_over_once_the_bound_is_reached(loop):
    """The router's queue-length cache counts requests it sent, so a burst about one image fills
    the home up to the imbalance bound and then spills to the second choice."""
    replicas = [FakeReplica(f"replica-{i}", max_ongoing=16) for i in range(3)]
    home, second, _ = rendezvous_rank("k", [r.replica_id.unique_id for r in replicas])
    router = make_router(loop, replicas, max_load_imbalance=2)
    picks = []
    for i in range(6):
        pick = route(loop, router, request("k", f"r{i}"))
        router.on_send_request(router._replicas[ReplicaID(pick, DEPLOYMENT)].replica_id)  # what Serve does
        picks.append(pick)
    assert picks[:3] == [home] * 3
    assert set(picks[3:]) <= {home, second} and second in picks[3:]
    assert decisions(router)[("affinity", "second_choice")] >= 1


def test_full_home_is_skipped_whatever_the_imbalance_bound(loop):
    replicas = [FakeReplica(f"replica-{i}") for i in range(2)]
    home = home_of("k", replicas)
    router = make_router(loop, replicas, max_load_imbalance=100)
    for r in replicas:
        r.queue_len = r.max_ongoing_requests if r.replica_id.unique_id == home else 1
    assert route(loop, router, request("k", "r1")) != home


def test_dead_home_is_never_chosen(loop):
    replicas = [FakeReplica(f"replica-{i}") for i in range(3)]
    home, second, _ = rendezvous_rank("k", [r.replica_id.unique_id for r in replicas])
    router = make_router(loop, replicas)
    assert route(loop, router, request("k", "r1")) == home
    # The controller has not noticed yet, but the probe gets ActorDiedError: the base class
    # drops the replica and the request goes to the image's next rendezvous choice.
    dead = next(r for r in replicas if r.replica_id.unique_id == home)
    dead.is_dead = True
    router.replica_queue_len_cache.invalidate_key(dead.replica_id)
    assert route(loop, router, request("k", "r2")) == second
    assert dead.replica_id not in router.curr_replicas
    # Once the controller broadcasts the new replica set, the dead one stays out.
    router.update_replicas([r for r in replicas if r is not dead])  # type: ignore[arg-type]
    assert {route(loop, router, request("k", f"r{i}")) for i in range(3, 6)} == {second}


def test_retries_of_one_request_count_one_decision(loop):
    replicas = [FakeReplica(f"replica-{i}") for i in range(2)]
    router = make_router(loop, replicas)
    pending = request("k", "r1")
    for _ in range(3):
        loop.run_until_complete(router.choose_replicas(router._replicas_list, pending))
    assert decisions(router) == {("affinity", "home"): 1}
    assert router.decision_for("r1").home_id == home_of("k", replicas)
