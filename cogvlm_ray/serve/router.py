"""`ImageAffinityRouter`: Ray Serve request router for the ModelServer deployment.

Serve runs one router per deployment handle, in the caller's process (here: each ingress
replica). For every request it calls `choose_replicas(candidate_replicas, pending_request)` and
tries the returned ranks in order, sending the request to the least loaded replica of the first
rank that accepts it. This router

- reads the image key from the `affinity_key` keyword argument of `ModelServer.generate` (set
  by the ingress backend from the request's messages; see `serve/affinity.py` for why the key is
  the image reference, not the preprocessor's content hash, and for the rendezvous-hashing state
  mechanism);
- ranks the image's rendezvous home first when its load is within `max_load_imbalance` of the
  least loaded replica, else the second rendezvous choice, else falls back to Serve's default
  power-of-two choices; the fallback rank is always appended, so a home that turns out full
  (a race with other routers) costs one rejection, not a stall;
- routes text-only requests (no key) with the unchanged power-of-two policy;
- only ever sees live replicas: Serve's controller broadcasts RUNNING replicas only (draining,
  STOPPING replicas are dropped before their graceful shutdown), and the base class removes a
  replica the moment a probe or a request reports `ActorDiedError`, then re-routes the request;
- records each request's decision once in `cogvlm_routing_decisions_total{outcome, reason}`.

Unlike Serve's default router it does not fulfil requests in FIFO order (no `FIFOMixin`): a
replica found for one image must go to that request, not to the oldest pending one. Ray
Serve LLM's `PrefixCacheAffinityRouter` makes the same choice.

Configured by `serve/app.py` (`AppArgs.routing`) through `RequestRouterConfig`:
`request_router_class="cogvlm_ray.serve.router:ImageAffinityRouter"` and `request_router_kwargs`
= `initialize_state`'s arguments.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from ray import serve
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.exceptions import RayServeException
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from cogvlm_ray.serve import metrics as m
from cogvlm_ray.serve.affinity import AFFINITY_KWARG, AffinityPolicy, ReplicaLoad, RoutingDecision, decide

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "cogvlm_ray.serve.router:ImageAffinityRouter"
_MAX_REMEMBERED_REQUESTS = 4096
_TEXT_ONLY = RoutingDecision(None, "default", "text_only")


class ImageAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Send requests about one image to the replica whose image-feature cache holds it."""

    def initialize_state(
        self,
        max_load_imbalance: int = 4,
        max_affinity_candidates: int = 2,
        metrics_dir: str | None = None,
        ray_metrics: bool = False,
        record_metrics: bool = True,
    ) -> None:
        """Called by Serve with `request_router_kwargs`.

        `metrics_dir`/`ray_metrics`: where the process-wide `Metrics` of this (ingress) process
        writes; the same values the ingress uses, so routing decisions appear on `/metrics`.
        """
        self.policy = AffinityPolicy(max_load_imbalance=max_load_imbalance,
                                     max_affinity_candidates=max_affinity_candidates)  # fmt: skip
        self._metrics_dir = metrics_dir
        self._ray_metrics = ray_metrics
        self._record_metrics = record_metrics
        self._metrics: m.Metrics | None = None
        self._decided: OrderedDict[str, RoutingDecision] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        fallback = await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self, candidate_replicas=candidate_replicas, pending_request=pending_request
        )
        key = pending_request.kwargs.get(AFFINITY_KWARG) if pending_request is not None else None
        if not isinstance(key, str) or not candidate_replicas:
            self._remember(pending_request, _TEXT_ONLY)
            return fallback
        loads = await self._current_loads(candidate_replicas)
        decision = decide(key, loads, self.policy)
        self._remember(pending_request, decision)
        if decision.chosen_id is None:
            return fallback
        chosen = next(r for r in candidate_replicas if r.replica_id.unique_id == decision.chosen_id)
        return [[chosen], *fallback]

    async def _current_loads(self, replicas: list[RunningReplica]) -> list[ReplicaLoad]:
        """Ongoing requests per replica: the router's queue-length cache, probing the replicas
        missing from it (one RPC each, with Serve's deadline; no answer -> None)."""
        loads: dict[Any, int | None] = {}
        missing: list[RunningReplica] = []
        for replica in replicas:
            cached = (
                self._replica_queue_len_cache.get(replica.replica_id)
                if self._use_replica_queue_len_cache
                else None
            )
            if cached is None:
                missing.append(replica)
            else:
                loads[replica.replica_id] = cached
        if missing:
            for replica, queue_len in await self._probe_queue_lens(missing, 0):
                loads[replica.replica_id] = queue_len
        return [
            ReplicaLoad(r.replica_id.unique_id, loads.get(r.replica_id), r.max_ongoing_requests)
            for r in replicas
            if r.replica_id in self._replicas  # a probe may have found it dead
        ]

    def _remember(self, pending_request: PendingRequest | None, decision: RoutingDecision) -> None:
        """Record the first decision per request (Serve calls `choose_replicas` again while it
        retries or backs off; those repeats are not new decisions)."""
        if pending_request is None:
            return
        request_id = pending_request.metadata.internal_request_id
        if request_id in self._decided:
            return
        self._decided[request_id] = decision
        if len(self._decided) > _MAX_REMEMBERED_REQUESTS:
            self._decided.popitem(last=False)
        if decision.outcome != "default":
            logger.debug("request %s: %s (%s), home %s", request_id, decision.outcome, decision.reason,
                         decision.home_id)  # fmt: skip
        metrics = self._get_metrics()
        if metrics is not None:
            metrics.inc(m.ROUTING_DECISIONS, outcome=decision.outcome, reason=decision.reason)

    def _get_metrics(self) -> m.Metrics | None:
        """The process's metrics, only inside a Serve replica (the ingress): a handle in a driver
        (a test, a script) must not switch its process to multiprocess mode."""
        if self._metrics is None and self._record_metrics:
            try:
                serve.get_replica_context()
            except RayServeException:
                self._record_metrics = False
                return None
            self._metrics = m.get_metrics(multiprocess_dir=self._metrics_dir, use_ray=self._ray_metrics)
        return self._metrics

    def decision_for(self, internal_request_id: str) -> RoutingDecision | None:
        """The decision recorded for a request (tests and debugging)."""
        return self._decided.get(internal_request_id)
