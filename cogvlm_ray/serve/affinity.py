"""Image-affinity routing policy: pure functions, no Ray (the Serve adapter is `serve/router.py`).

Owns: the affinity key of a chat request (`image_affinity_key`), the rendezvous ranking of live
replicas for a key (`rendezvous_rank`), and the decision with bounded load (`decide`). It does not
own load measurement, replica liveness or metrics: the router feeds it a snapshot of live
replicas with their queue lengths and records what it returns.

State mechanism: rendezvous (highest-random-weight) hashing of the image key over the live
replicas, with a load bound. Every router computes the same home replica for an image from the
image key and the replica ids alone, so

- nothing has to be reported or stored: no replica -> router channel, no shared actor, no staleness
  window in which a router believes a replica still holds an evicted image;
- several ingress replicas (each with its own router) agree without talking to each other, which a
  per-router "where did I send it" table cannot do;
- when a replica dies or is added, only the images homed on it move (1/N of them), the rest keep
  their cache hits.

What it gives up: the router does not know whether the home replica still has the image (LRU
eviction) or whether an image is new. That costs nothing: a new image is a miss on every replica,
and hashing spreads new images uniformly, as random choice would. The load bound keeps a popular
image from overloading its home: past `max_load_imbalance` ongoing requests above the least loaded
replica, the request goes to the image's second rendezvous choice (so overflow for one image also
lands on one stable replica, which then caches it too), then to load-based choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

AFFINITY_KWARG = "affinity_key"
"""Keyword argument of `ModelServer.generate` that carries the key to the router."""

Outcome = Literal["affinity", "fallback", "default"]
Reason = Literal["home", "second_choice", "overloaded", "no_load_info", "text_only"]


@dataclass(frozen=True)
class AffinityPolicy:
    """Knobs of the image-affinity router (`request_router_kwargs` in the Serve config)."""

    max_load_imbalance: int = 4
    """A ranked replica is eligible while its ongoing requests exceed the least loaded live
    replica's by at most this many (and it is not full)."""
    max_affinity_candidates: int = 2
    """How many replicas of the image's rendezvous ranking to try before load-based choice."""

    def __post_init__(self) -> None:
        if self.max_load_imbalance < 0:
            raise ValueError("max_load_imbalance must be >= 0")
        if self.max_affinity_candidates < 1:
            raise ValueError("max_affinity_candidates must be >= 1")


@dataclass(frozen=True)
class ReplicaLoad:
    """A live replica as the policy sees it."""

    replica_id: str
    num_ongoing: int | None
    """Ongoing requests, or None when the replica did not report in time."""
    max_ongoing: int


@dataclass(frozen=True)
class RoutingDecision:
    chosen_id: str | None
    """The replica to try first; None means load-based choice over all replicas."""
    outcome: Outcome
    reason: Reason
    home_id: str | None = None
    """The image's rendezvous home (None for text-only requests)."""


#: How much of an image reference the affinity key reads: the first and last few KB and a few
#: evenly spaced windows, plus the length. A 32 MB data URL costs the same as a short one.
_KEY_EDGE_CHARS = 4096
_KEY_WINDOWS = 16
_KEY_WINDOW_CHARS = 256


def image_affinity_key(image_urls: Sequence[str]) -> str | None:
    """A short stable key for the image of a chat request (`Conversation.image_urls`), or None.

    It hashes the image reference as sent (the data URL or the http URL), not the decoded pixels:
    the router runs in the ingress before preprocessing, and follow-up turns of a conversation
    resend the same reference. It reads a bounded sample of the reference (see above), never the
    whole base64 image. Two references that share length and every sampled window get one key:
    that only sends them to the same replica, never changes an answer (the engine's cache key is
    the preprocessor's content hash of the full bytes). With several images (rejected later with
    a 400) the first one counts.
    """
    url = next((u for u in image_urls if u), None)
    if url is None:
        return None
    digest = hashlib.blake2b(f"{len(url)}:".encode(), digest_size=16)
    if len(url) <= 2 * _KEY_EDGE_CHARS + _KEY_WINDOWS * _KEY_WINDOW_CHARS:
        digest.update(url.encode())
    else:
        digest.update(url[:_KEY_EDGE_CHARS].encode())
        stride = len(url) // (_KEY_WINDOWS + 1)
        for i in range(1, _KEY_WINDOWS + 1):
            digest.update(url[i * stride : i * stride + _KEY_WINDOW_CHARS].encode())
        digest.update(url[-_KEY_EDGE_CHARS:].encode())
    return digest.hexdigest()


def rendezvous_score(key: str, replica_id: str) -> int:
    """The weight of `replica_id` for `key`; the highest weight is the key's home."""
    digest = hashlib.blake2b(f"{key}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_rank(key: str, replica_ids: Iterable[str]) -> list[str]:
    """Replica ids from the key's home to its least preferred (deterministic, ties by id)."""
    return sorted(replica_ids, key=lambda rid: (-rendezvous_score(key, rid), rid))


def decide(key: str, replicas: Sequence[ReplicaLoad], policy: AffinityPolicy) -> RoutingDecision:
    """Choose the replica for an image request among live `replicas` (see the module docstring).

    A ranked replica is eligible when its load is known, below its `max_ongoing`, and within
    `policy.max_load_imbalance` of the least loaded replica that reported. When none of the first
    `max_affinity_candidates` is eligible, the caller falls back to load-based choice.
    """
    if not replicas:
        return RoutingDecision(None, "fallback", "no_load_info")
    by_id = {r.replica_id: r for r in replicas}
    ranking = rendezvous_rank(key, by_id)
    home_id = ranking[0]
    known = [r.num_ongoing for r in replicas if r.num_ongoing is not None]
    if not known:
        return RoutingDecision(None, "fallback", "no_load_info", home_id)
    min_load = min(known)
    for rank, replica_id in enumerate(ranking[: policy.max_affinity_candidates]):
        load = by_id[replica_id].num_ongoing
        if load is None or load >= by_id[replica_id].max_ongoing:
            continue
        if load - min_load <= policy.max_load_imbalance:
            return RoutingDecision(replica_id, "affinity", "home" if rank == 0 else "second_choice", home_id)
    reason: Reason = "no_load_info" if by_id[home_id].num_ongoing is None else "overloaded"
    return RoutingDecision(None, "fallback", reason, home_id)
