"""Image-affinity routing with two ModelServer replicas of the tiny model, over HTTP.

A second application (route `/affinity`, 2 model replicas, fractional CPUs) runs in the session's
cluster next to the main one, so killing one of its replicas disturbs no other test. Where a
request ran is read from each replica's own engine stats (`get_replica_stats`).
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from cogvlm_ray.serve.affinity import image_affinity_key, rendezvous_rank
from tests.integration.conftest import API_KEY, ServeApp, integration_app_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

APP = "cogvlm_affinity"
ROUTE = "/affinity"
MODEL_SERVER = "ModelServer"


def with_deployment_options(app: Any, options: dict[str, dict[str, Any]]) -> Any:
    """Rebind every deployment of a built application with extra options (what a Serve config's
    `deployments:` section does), keeping the args `build_app` bound."""
    from ray.serve import Application

    deployment = app._bound_deployment
    args = [
        with_deployment_options(a, options) if isinstance(a, Application) else a for a in deployment.init_args
    ]
    return deployment.options(**options.get(deployment.name, {})).bind(*args, **deployment.init_kwargs)


def image_url(seed: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40 + seed, 32), ((seed * 53) % 256, (seed * 97) % 256, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(url: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@dataclass
class AffinityApp:
    base_url: str
    client: openai.OpenAI

    def replica_stats(self) -> dict[str, tuple[int, int]]:
        """replica id -> (image cache hits, queries), polling until every RUNNING replica answered."""
        from ray import serve

        handle = serve.get_deployment_handle(MODEL_SERVER, app_name=APP)
        expected = serve.status().applications[APP].deployments[MODEL_SERVER].replica_states.get("RUNNING", 0)
        seen: dict[str, tuple[int, int]] = {}
        for _ in range(200):
            replica_id, stats = handle.get_replica_stats.remote().result()
            seen[replica_id] = (stats.image_cache_hits, stats.image_cache_queries)
            if len(seen) >= expected:
                break
        return seen

    def chat(self, messages: list[dict], **kwargs: Any) -> str:
        completion = self.client.chat.completions.create(model="cogvlm2-tiny", messages=messages, max_tokens=2,
                                                         temperature=0, **kwargs)  # fmt: skip
        return completion.choices[0].message.content or ""

    def routing_decisions(self) -> dict[tuple[str, str], float]:
        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        pattern = r'^cogvlm_routing_decisions_total\{(?=.*outcome="(\w+)")(?=.*reason="(\w+)").*\} (\S+)$'
        return {(o, r): float(v) for o, r, v in re.findall(pattern, text, flags=re.M)}


@pytest.fixture(scope="module")
def affinity_app(serve_app: ServeApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AffinityApp]:
    from ray import serve

    from cogvlm_ray.serve.app import build_app

    tmp = tmp_path_factory.mktemp("affinity")
    # Imbalance 0: a replica with one more request than the other is "overloaded", so one long
    # stream is enough to see the fallback. One candidate: the fallback is load-based.
    args = integration_app_args(tmp) | {"routing": {"max_load_imbalance": 0, "max_affinity_candidates": 1}}
    app = with_deployment_options(build_app(args), {
        "Preprocessor": {"ray_actor_options": {"num_cpus": 0.1}},
        MODEL_SERVER: {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
    })  # fmt: skip
    serve.run(app, name=APP, route_prefix=ROUTE)
    base_url = serve_app.base_url + ROUTE
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    try:
        yield AffinityApp(base_url=base_url, client=client)
    finally:
        serve.delete(APP, _blocking=False)


def delta(
    after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    return {
        rid: (h - before.get(rid, (0, 0))[0], q - before.get(rid, (0, 0))[1]) for rid, (h, q) in after.items()
    }


def test_follow_ups_about_an_image_land_on_the_replica_that_cached_it(affinity_app: AffinityApp):
    before = affinity_app.replica_stats()
    replica_ids = sorted(before)
    assert len(replica_ids) == 2
    urls = [image_url(seed) for seed in range(6)]
    homes = [rendezvous_rank(image_affinity_key([url]), replica_ids)[0] for url in urls]
    for url in urls:
        for question in ("What is this?", "What colour is it?", "Describe it.", "Anything else?"):
            assert isinstance(affinity_app.chat(ask(url, question)), str)
    # Each image: 4 queries on its home replica, the first a miss and the 3 follow-ups hits.
    expected = {rid: (3 * homes.count(rid), 4 * homes.count(rid)) for rid in replica_ids}
    assert delta(affinity_app.replica_stats(), before) == expected
    assert affinity_app.routing_decisions().get(("affinity", "home"), 0) >= 24


def test_text_only_requests_are_served_with_the_default_policy(affinity_app: AffinityApp):
    before = affinity_app.routing_decisions().get(("default", "text_only"), 0)
    assert isinstance(affinity_app.chat([{"role": "user", "content": "Hello there"}]), str)
    assert affinity_app.routing_decisions().get(("default", "text_only"), 0) == before + 1


def test_overloaded_home_falls_back_to_the_other_replica(affinity_app: AffinityApp):
    url = image_url(100)
    before = affinity_app.replica_stats()
    home = rendezvous_rank(image_affinity_key([url]), sorted(before))[0]
    fallbacks = affinity_app.routing_decisions().get(("fallback", "overloaded"), 0)
    first_chunk = threading.Event()
    long_stream: dict[str, Any] = {}

    def stream_long_answer() -> None:
        stream = affinity_app.client.chat.completions.create(
            model="cogvlm2-tiny", messages=ask(url, "Tell me everything."), max_tokens=400, temperature=0,
            stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        chunks = 0
        for _ in stream:
            chunks += 1
            first_chunk.set()
        long_stream["chunks"] = chunks
        long_stream["finished_at"] = time.monotonic()

    thread = threading.Thread(target=stream_long_answer)
    thread.start()
    assert first_chunk.wait(60)
    sent_at = time.monotonic()
    affinity_app.chat(ask(url, "Short question."))
    thread.join(120)
    assert long_stream["finished_at"] > sent_at, "the long stream must still run when the follow-up is routed"
    changes = delta(affinity_app.replica_stats(), before)
    other = next(rid for rid in changes if rid != home)
    assert changes[home][1] == 1 and changes[other] == (0, 1), changes
    assert affinity_app.routing_decisions().get(("fallback", "overloaded"), 0) == fallbacks + 1


def test_killing_the_home_replica_still_serves_the_follow_up(affinity_app: AffinityApp):
    import ray
    from ray.serve._private.common import DeploymentID, ReplicaID

    url = image_url(200)
    home = rendezvous_rank(image_affinity_key([url]), sorted(affinity_app.replica_stats()))[0]
    affinity_app.chat(ask(url, "What is this?"))
    before = affinity_app.replica_stats()
    actor_name = ReplicaID(home, DeploymentID(name=MODEL_SERVER, app_name=APP)).to_full_id_str()
    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)
    # The follow-up is routed while the router may still list the dead home: the probe or the
    # send fails with ActorDiedError, Serve drops the replica and routes again.
    assert isinstance(affinity_app.chat(ask(url, "And now?")), str)
    changes = delta(affinity_app.replica_stats(), before)
    assert home not in changes
    assert sum(queries for _, queries in changes.values()) == 1, "served (as a cache miss) by a live replica"
