"""The pure image-affinity policy: keys, rendezvous ranking, bounded-load decisions."""

from __future__ import annotations

from collections import Counter

import pytest

from cogvlm_ray.preprocess.messages import parse_messages
from cogvlm_ray.serve.affinity import (
    AffinityPolicy,
    ReplicaLoad,
    decide,
    image_affinity_key,
    rendezvous_rank,
)

CAT = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
DOG = "https://example.com/dog.jpg"


def turn(url: str, text: str = "What is this?") -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }


def loads(**num_ongoing: int | None) -> list[ReplicaLoad]:
    return [ReplicaLoad(rid, n, max_ongoing=8) for rid, n in num_ongoing.items()]


def key(messages: list[dict]) -> str | None:
    return image_affinity_key(parse_messages(messages).image_urls)


def test_key_is_stable_across_turns_and_differs_between_images():
    first = [turn(CAT)]
    follow_up = [
        turn(CAT),
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
    ]
    assert key(first) == key(follow_up) is not None
    assert key([turn(DOG)]) not in (None, key(first))
    assert key([turn(CAT, "another question")]) == key(first)


def test_text_only_requests_have_no_key():
    assert key([{"role": "user", "content": "hi"}]) is None
    assert key([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) is None
    assert image_affinity_key([]) is None and image_affinity_key([""]) is None


def test_key_of_a_big_data_url_reads_a_bounded_sample():
    """Not the whole base64 image: bytes outside the sampled windows do not change the key,
    while the length, the head, the tail and the sampled windows do."""
    body = "A" * (8 * 1024 * 1024)
    url = "data:image/png;base64," + body
    middle = len(url) // 2 + 1000  # between two sampled windows
    changed_outside = url[:middle] + "B" + url[middle + 1 :]
    assert image_affinity_key([url]) == image_affinity_key([changed_outside])
    assert image_affinity_key([url]) != image_affinity_key([url + "A"])  # length
    assert image_affinity_key([url]) != image_affinity_key([url[:-1] + "B"])  # tail
    assert image_affinity_key([url]) != image_affinity_key(["data:image/jpeg;base64," + body[1:]])  # head
    stride = len(url) // 17
    assert image_affinity_key([url]) != image_affinity_key(
        [url[:stride] + "B" + url[stride + 1 :]]
    )  # a window


def test_rank_is_deterministic_and_independent_of_replica_order():
    replicas = ["a", "b", "c", "d"]
    ranking = rendezvous_rank("k1", replicas)
    assert sorted(ranking) == replicas
    assert rendezvous_rank("k1", reversed(replicas)) == ranking


def test_losing_a_replica_moves_only_the_keys_it_was_home_for():
    keys = [f"image-{i}" for i in range(2000)]
    before = {k: rendezvous_rank(k, ["a", "b", "c", "d"])[0] for k in keys}
    after = {k: rendezvous_rank(k, ["a", "b", "d"])[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "c"}
    # ... and they move to their second choice, spread over the survivors.
    assert all(after[k] == rendezvous_rank(k, ["a", "b", "c", "d"])[1] for k in moved)
    counts = Counter(before.values())
    assert set(counts) == {"a", "b", "c", "d"} and min(counts.values()) > 400  # ~500 each


def test_balanced_load_goes_home():
    home = rendezvous_rank("k", ["a", "b", "c"])[0]
    decision = decide("k", loads(a=1, b=0, c=2), AffinityPolicy(max_load_imbalance=2))
    assert (decision.chosen_id, decision.outcome, decision.reason, decision.home_id) == (
        home,
        "affinity",
        "home",
        home,
    )


def test_overloaded_home_goes_to_the_second_choice_then_falls_back():
    home, second, third = rendezvous_rank("k", ["a", "b", "c"])
    policy = AffinityPolicy(max_load_imbalance=2)
    decision = decide("k", loads(**{home: 5, second: 2, third: 0}), policy)
    assert (decision.chosen_id, decision.outcome, decision.reason) == (second, "affinity", "second_choice")
    decision = decide("k", loads(**{home: 5, second: 3, third: 0}), policy)
    assert (decision.chosen_id, decision.outcome, decision.reason) == (None, "fallback", "overloaded")
    # With one candidate the second choice is never tried.
    decision = decide(
        "k", loads(**{home: 5, second: 2, third: 0}), AffinityPolicy(2, max_affinity_candidates=1)
    )
    assert (decision.chosen_id, decision.reason) == (None, "overloaded")


def test_imbalance_is_inclusive_and_a_full_home_is_skipped():
    home, second = rendezvous_rank("k", ["a", "b"])
    assert decide("k", loads(**{home: 2, second: 0}), AffinityPolicy(max_load_imbalance=2)).chosen_id == home
    full = [ReplicaLoad(home, 4, max_ongoing=4), ReplicaLoad(second, 4, max_ongoing=8)]
    decision = decide("k", full, AffinityPolicy(max_load_imbalance=10))
    assert (decision.chosen_id, decision.reason) == (second, "second_choice")


def test_missing_load_information():
    home, second = rendezvous_rank("k", ["a", "b"])
    decision = decide("k", loads(**{home: None, second: 0}), AffinityPolicy())
    assert (decision.chosen_id, decision.reason) == (second, "second_choice")
    decision = decide("k", loads(a=None, b=None), AffinityPolicy())
    assert (decision.chosen_id, decision.outcome, decision.reason, decision.home_id) == (
        None, "fallback", "no_load_info", home)  # fmt: skip
    assert decide("k", [], AffinityPolicy()).chosen_id is None


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        AffinityPolicy(max_load_imbalance=-1)
    with pytest.raises(ValueError):
        AffinityPolicy(max_affinity_candidates=0)
