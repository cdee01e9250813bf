"""The cluster scenarios: scale up and down, node loss, rolling update, each under load.

Each scenario drives a `StreamingLoad` against the app on a `LocalAutoscalingCluster`, marks its
events on a shared `Timeline` and returns what it observed (times, replica ids, every request's
result) as a JSON-able dict. Scenarios record; they do not judge: `tests/cluster/checks.py`
turns a recording into pass/fail, so the pytest tests and the benchmark share one definition.
Every wait is bounded (`wait_for` raises TimeoutError, which the runner records).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.cluster.app_config import API_KEY, APP_NAME, MODEL_NAME, with_changes
from tests.cluster.load import LoadSpec, StreamingLoad, summarize
from tests.cluster.local_cluster import LocalAutoscalingCluster, wait_for
from tests.cluster.timeline import MODEL_DEPLOYMENT, Timeline, alive_gpu_nodes, model_replica_states

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """How long and how hard each scenario pushes (smoke: the default CI run; full: on purpose)."""

    name: str
    max_replicas: int
    burst_concurrency: int
    burst_max_tokens: int
    hold_s: float
    trickle_concurrency: int
    trickle_max_tokens: int
    scale_timeout_s: float
    max_requests: int


SMOKE = Profile("smoke", max_replicas=2, burst_concurrency=11, burst_max_tokens=24, hold_s=4.0,
                trickle_concurrency=2, trickle_max_tokens=240, scale_timeout_s=150.0, max_requests=800)  # fmt: skip
FULL = Profile("full", max_replicas=3, burst_concurrency=14, burst_max_tokens=32, hold_s=15.0,
               trickle_concurrency=2, trickle_max_tokens=300, scale_timeout_s=240.0, max_requests=3000)  # fmt: skip
PROFILES = {p.name: p for p in (SMOKE, FULL)}


@dataclass
class Session:
    cluster: LocalAutoscalingCluster
    base_url: str
    config: dict[str, Any]
    config_path: Path
    timeline: Timeline

    def load(self, profile: Profile, *, max_tokens: int, max_concurrency: int = 16) -> StreamingLoad:
        """A new load on the timeline's clock, attached to the timeline."""
        spec = LoadSpec(self.base_url, API_KEY, MODEL_NAME, max_concurrency=max_concurrency,
                        max_requests=profile.max_requests, max_tokens=max_tokens)  # fmt: skip
        load = StreamingLoad(spec, t0=self.timeline.t0)
        self.timeline.load = load
        return load


def deploy(config_path: Path, dashboard_url: str) -> float:
    """`serve deploy` the config through the dashboard's REST API; returns the CLI's seconds."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "deploy", "-a", dashboard_url, str(config_path)],
        capture_output=True, text=True, timeout=240,  # it starts Serve on first use: slow on a busy box
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"serve deploy failed: {done.stderr[-2000:]}")
    return time.monotonic() - start


def app_running() -> bool:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    return app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING"


def model_replicas() -> dict[str, dict[str, Any]]:
    """Alive ModelServer replica actors: {replica id: {pid, node_id}} from the GCS actor table."""
    from ray._private import state

    out = {}
    for actor in state.actors(actor_state_name="ALIVE").values():
        if actor["ActorClassName"] != f"ServeReplica:{APP_NAME}:{MODEL_DEPLOYMENT}":
            continue
        replica_id = actor["Name"].rsplit("#", 1)[-1]
        out[replica_id] = {"pid": actor["Pid"], "node_id": actor["Address"]["NodeID"]}
    return out


def _results(load: StreamingLoad) -> list[dict[str, Any]]:
    return [asdict(r) for r in load.results]


# -- scale up and down -----------------------------------------------------------------------


def scale_up_down(session: Session, profile: Profile) -> dict[str, Any]:
    """Burst until `max_replicas` replicas serve, hold, then a trickle of long streams while
    Serve scales back to min (the removed replicas drain them), then stop and wait for the
    autoscaler to remove the idle nodes."""
    load = session.load(profile, max_tokens=profile.burst_max_tokens).start(profile.burst_concurrency)
    timeline = session.timeline
    out: dict[str, Any] = {"profile": asdict(profile)}
    try:
        out["t_load_start"] = timeline.mark("burst", concurrency=profile.burst_concurrency)
        initial = set(model_replicas())
        out["initial_replicas"] = sorted(initial)

        def all_serving() -> bool:
            sample = timeline.latest()
            if sample is None or sample.num_running < profile.max_replicas:
                return False
            served = {rid for rid, n in sample.replica_requests.items() if n > 0}
            return len(served & set(model_replicas())) >= profile.max_replicas

        wait_for(all_serving, profile.scale_timeout_s, what=f"{profile.max_replicas} replicas serving")
        out["t_all_serving"] = timeline.mark("all_replicas_serving", replicas=sorted(model_replicas()))
        out["scaled_replicas"] = sorted(model_replicas())
        time.sleep(profile.hold_s)
        # Long text-only streams, spread over the replicas, so the ones Serve removes have some to drain.
        load.set_concurrency(
            profile.trickle_concurrency, max_tokens=profile.trickle_max_tokens, with_images=False
        )
        out["t_trickle"] = timeline.mark("trickle", concurrency=profile.trickle_concurrency)

        stopping: list[dict[str, Any]] = out.setdefault("stopping_observations", [])

        def back_to_min() -> bool:
            states = model_replica_states(APP_NAME)
            if states.get("STOPPING"):  # who is draining, and what Ray's metrics say it still serves
                sample = timeline.latest()
                stopping.append({"t": round(timeline.now(), 2), "states": states, "alive": sorted(model_replicas()),
                                 "ongoing": sample.replica_ongoing if sample else {}})  # fmt: skip
            return states.get("RUNNING", 0) == 1 and set(states) == {"RUNNING"}

        wait_for(back_to_min, profile.scale_timeout_s, what="scale down to 1 replica")
        out["t_replicas_min"] = timeline.mark("replicas_back_to_min", replicas=sorted(model_replicas()))
        load.stop()
        out["t_load_stop"] = timeline.mark("load_stopped")
        wait_for(lambda: len(alive_gpu_nodes()) == 1, profile.scale_timeout_s, what="idle GPU nodes removed")
        out["t_nodes_min"] = timeline.mark("nodes_back_to_min")
    finally:
        load.stop()
        out["results"] = _results(load)
        out["summary"] = summarize(load.results)
    return out


# -- node loss --------------------------------------------------------------------------------


def node_loss(
    session: Session, profile: Profile, *, concurrency: int = 6, max_tokens: int = 120
) -> dict[str, Any]:
    """Kill the raylet of a worker node whose replica serves streams; record how its streams end
    and how long until the replica count is back."""
    load = session.load(profile, max_tokens=max_tokens).start(concurrency)
    timeline = session.timeline
    out: dict[str, Any] = {}
    try:
        out["t_load_start"] = timeline.mark("node_loss_load", concurrency=concurrency)

        def victim() -> tuple[str, dict[str, Any]] | None:
            sample = timeline.latest()
            replicas = model_replicas()
            if sample is None or sample.num_running < 2 or len(replicas) < 2:
                return None
            busy = [(rid, info) for rid, info in replicas.items() if sample.replica_ongoing.get(rid, 0) >= 1]
            heads = {n.node_id for n in session.cluster.alive_nodes() if n.is_head}
            busy = [(rid, info) for rid, info in busy if info["node_id"] not in heads]
            return busy[0] if busy else None

        replica_id, info = wait_for(victim, profile.scale_timeout_s, what="two replicas with a busy one")
        time.sleep(1.0)  # let streams get going on it
        before = model_replicas()
        num_running_before = model_replica_states(APP_NAME).get("RUNNING", 0)
        latest = timeline.latest()
        ongoing = latest.replica_ongoing if latest is not None else {}
        pid = session.cluster.kill_raylet(info["node_id"])
        out["t_kill"] = timeline.mark(
            "raylet_killed", node_id=info["node_id"], raylet_pid=pid, replica=replica_id
        )
        out.update(
            killed_replica=replica_id,
            killed_node=info["node_id"],
            replicas_before=sorted(before),
            running_before=num_running_before,
            ongoing_at_kill={k: v for k, v in ongoing.items() if k in before},
        )

        # The replica process outlives its raylet until the GCS declares the node dead (its
        # health checks: ~15 s by default); only then does its actor die.
        wait_for(lambda: replica_id not in model_replicas(), 60, interval_s=0.2, what="replica declared dead")
        out["t_replica_dead"] = timeline.mark("replica_declared_dead", replica=replica_id)

        def recovered() -> bool:
            return model_replica_states(APP_NAME).get("RUNNING", 0) >= num_running_before

        wait_for(recovered, profile.scale_timeout_s, what="replica replaced")
        out["t_recovered"] = timeline.mark("replica_replaced", replicas=sorted(model_replicas()))
        out["replicas_after"] = sorted(model_replicas())
        time.sleep(8.0)  # requests sent after recovery
        out["t_after_window_end"] = timeline.mark("post_recovery_window_end")
    finally:
        load.stop()
        out["results"] = _results(load)
        out["summary"] = summarize(load.results)
    return out


# -- rolling update ---------------------------------------------------------------------------


def rolling_update(
    session: Session, profile: Profile, *, concurrency: int = 4, new_default_max_tokens: int = 21
) -> dict[str, Any]:
    """`serve deploy` a changed config (new default_max_tokens, a new engine setting) while
    streams run; record when every old ModelServer replica is gone and what new requests get."""
    load = session.load(profile, max_tokens=48).start(concurrency)
    timeline = session.timeline
    out: dict[str, Any] = {}
    try:
        out["t_load_start"] = timeline.mark("rolling_update_load", concurrency=concurrency)
        time.sleep(4.0)
        old = set(model_replicas())
        changed = with_changes(session.config, default_max_tokens=new_default_max_tokens,
                               engine={"max_num_batched_tokens": 1024})  # fmt: skip
        path = session.config_path.with_name("serve_config.updated.yaml")
        path.write_text(yaml.safe_dump(changed))
        out["t_deploy"] = timeline.mark("serve_deploy", default_max_tokens=new_default_max_tokens)
        out["deploy_cli_s"] = deploy(path, session.cluster.dashboard_url)
        out["old_replicas"] = sorted(old)

        def updated() -> bool:
            replicas = set(model_replicas())
            return bool(replicas) and not (replicas & old) and app_running()

        wait_for(updated, profile.scale_timeout_s, what="old replicas replaced")
        out["t_updated"] = timeline.mark("update_complete", replicas=sorted(model_replicas()))
        out["new_replicas"] = sorted(model_replicas())
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        reply = httpx.post(session.base_url + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)  # fmt: skip
        out["default_tokens_after"] = reply.json().get("usage", {}).get("completion_tokens")
        out["new_default_max_tokens"] = new_default_max_tokens
        time.sleep(3.0)
    finally:
        load.stop()
        out["results"] = _results(load)
        out["summary"] = summarize(load.results)
    return out
