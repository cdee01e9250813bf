"""Draw a recorded cluster timeline (replicas, nodes, queue, latency over time) as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["timeline"]["samples"]
    events = report["timeline"]["events"]
    t = [s["t"] for s in samples]
    fig, (ax_rep, ax_queue, ax_lat) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for state, style in (("RUNNING", "-"), ("STARTING", "--"), ("STOPPING", ":")):
        # No states at all: Serve does not list the deployment (before the first deploy, and for
        # a few seconds while `serve deploy` builds a new version): a gap, not zero replicas.
        counts = [s["replicas"].get(state, 0) if s["replicas"] else float("nan") for s in samples]
        ax_rep.step(t, counts, style, where="post", label=f"ModelServer {state}")
    ax_rep.step(t, [s["num_gpu_nodes"] for s in samples], "-", where="post", color="black", alpha=0.5,
                linewidth=3, label="GPU worker nodes")  # fmt: skip
    ax_rep.set_ylabel("count")
    ax_rep.legend(loc="upper right", fontsize=8)
    ax_queue.plot(t, [s["in_flight"] for s in samples], label="client: in flight")
    ax_queue.plot(t, [s["waiting_first_token"] for s in samples], label="client: waiting for 1st token")
    ax_queue.plot(
        t, [sum(s["replica_ongoing"].values()) for s in samples], label="replicas: ongoing (Ray metrics)"
    )
    ax_queue.set_ylabel("requests")
    ax_queue.legend(loc="upper right", fontsize=8)
    ax_lat.plot(t, [s["p50_latency_s"] for s in samples], ".", label="p50 latency (finished in interval)")
    ax_lat.plot(t, [s["max_latency_s"] for s in samples], ".", label="max latency")
    ax_lat.plot(t, [s["p50_ttft_s"] for s in samples], ".", label="p50 TTFT")
    ax_lat.set_ylabel("seconds")
    ax_lat.set_xlabel("seconds since cluster start")
    ax_lat.legend(loc="upper right", fontsize=8)
    for ax in (ax_rep, ax_queue, ax_lat):
        for event in events:
            ax.axvline(event["t"], color="grey", alpha=0.3, linewidth=0.8)
    for event in events:
        ax_rep.annotate(event["event"], (event["t"], ax_rep.get_ylim()[1]), rotation=90, fontsize=6,
                        va="top", ha="right", color="dimgrey")  # fmt: skip
    fig.suptitle(f"cogvlm-ray on a fake multi-node Ray cluster ({report['profile']['name']} profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
