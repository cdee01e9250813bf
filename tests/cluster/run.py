"""Run the cluster scenarios on one fresh fake multi-node cluster and record them.

    python -m tests.cluster.run --profile full --out bench/results/cluster
    python -m tests.cluster.run --profile smoke --scenarios scale --out /tmp/x

Writes `<out>/cluster_<profile>.json` (the timeline, every request's result, the events and
each scenario's observations) and `<out>/cluster_<profile>.png`. The process is the Ray driver
of its own cluster, so it must not share a process with another Ray driver (such as the pytest
session's `serve_app` cluster): `tests/cluster/test_cluster.py` starts it as a subprocess in its
own process group. Exit status 0 when every scenario ran to its end (pass/fail is judged by
`tests/cluster/checks.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from cogvlm_ray.serve.ports import free_port
from tests.cluster import scenarios
from tests.cluster.app_config import APP_NAME, HEAD_RESOURCE, ClusterAppSpec, serve_config
from tests.cluster.local_cluster import LocalAutoscalingCluster, wait_for
from tests.cluster.timeline import Timeline

logger = logging.getLogger(__name__)

GPU_NODE_TYPE = "gpu_worker"
SCENARIOS = {
    "scale": scenarios.scale_up_down,
    "node_loss": scenarios.node_loss,
    "rolling_update": scenarios.rolling_update,
}


def make_cluster(max_workers: int) -> LocalAutoscalingCluster:
    """Head: CPUs for the ingress, preprocessing and Serve's actors, no GPU. GPU nodes: one
    logical GPU each, launched by the autoscaler on demand (one always up)."""
    worker = {
        "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100 * 2**20},
        "node_config": {},
        "min_workers": 1,
        "max_workers": max_workers,
    }
    return LocalAutoscalingCluster(
        {"CPU": 2, HEAD_RESOURCE: 1, "object_store_memory": 200 * 2**20},
        {GPU_NODE_TYPE: worker},
        idle_timeout_minutes=0.1,
    )


def start_head(cluster: LocalAutoscalingCluster, attempts: int = 2) -> None:
    """Start the head, once more if Ray's own startup timeout fires (it does when the GCS is
    starved of CPU on a busy 2-core machine)."""
    for attempt in range(1, attempts + 1):
        try:
            cluster.start(_system_config={"metrics_report_interval_ms": 1000})
            return
        except Exception:
            logger.warning("head start failed (attempt %d of %d)", attempt, attempts, exc_info=True)
            cluster.shutdown()
            if attempt == attempts:
                raise


def run(profile: scenarios.Profile, names: list[str], out_dir: Path, work_dir: Path) -> dict[str, Any]:
    import ray

    # One torch thread per replica: three replicas on two cores must not oversubscribe them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    cluster = make_cluster(max_workers=3)
    report: dict[str, Any] = {
        "profile": {"name": profile.name},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "load_average_at_start": os.getloadavg(),
        },  # fmt: skip
        "scenarios": {},
    }
    timeline = Timeline(APP_NAME, t0)
    try:
        start_head(cluster)
        ray.init(address=cluster.gcs_address, log_to_driver=False, logging_level="warning")
        spec = ClusterAppSpec(http_port=free_port(), work_dir=work_dir, max_replicas=profile.max_replicas)
        config = serve_config(spec)
        config_path = work_dir / "serve_config.cluster.yaml"
        config_path.write_text(yaml.safe_dump(config))
        report["serve_config"] = config
        timeline.start()
        bring_up: dict[str, float] = {"head_up": timeline.mark("head_up")}
        bring_up["deploy_cli_s"] = scenarios.deploy(config_path, cluster.dashboard_url)
        wait_for(scenarios.app_running, 240, what="app RUNNING")
        bring_up["app_running"] = timeline.mark("app_running")
        report["bring_up"] = bring_up
        session = scenarios.Session(
            cluster, f"http://127.0.0.1:{spec.http_port}", config, config_path, timeline
        )
        for name in names:
            started = time.monotonic()
            try:
                report["scenarios"][name] = SCENARIOS[name](session, profile)
            except Exception as e:
                logger.exception("scenario %s failed", name)
                report["scenarios"][name] = {"error": f"{type(e).__name__}: {e}"}
                break
            finally:
                report["scenarios"].setdefault(name, {})["wall_s"] = round(time.monotonic() - started, 1)
    except Exception as e:  # bring-up failed: say so in the report
        logger.exception("cluster bring-up failed")
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        timeline.stop()
        report["timeline"] = timeline.to_json()
        report["wall_s"] = round(time.monotonic() - t0, 1)
        report["machine"]["load_average_at_end"] = os.getloadavg()  # other jobs share the 2 cores
        write(report, out_dir, profile.name)
        ray.shutdown()
        cluster.shutdown()
    return report


def trimmed(report: dict[str, Any]) -> dict[str, Any]:
    """The report without every request's result (each scenario keeps its summary): what
    bench/results/cluster/ keeps, a few hundred KB smaller."""
    out = dict(report)
    out["scenarios"] = {
        name: {k: v for k, v in scenario.items() if k != "results"}
        for name, scenario in report["scenarios"].items()
    }
    return out


def write(report: dict[str, Any], out_dir: Path, name: str) -> Path:
    from tests.cluster.chart import draw

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cluster_{name}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    try:
        draw(report, out_dir / f"cluster_{name}.png")
    except Exception:
        logger.exception("could not draw the timeline chart")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(scenarios.PROFILES), default="smoke")
    parser.add_argument("--scenarios", default="scale,node_loss,rolling_update")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="cogvlm_cluster_"))
    report = run(scenarios.PROFILES[args.profile], names, args.out, work_dir)
    failed = [n for n, r in report["scenarios"].items() if "error" in r]
    return 1 if failed or len(report["scenarios"]) < len(names) else 0


if __name__ == "__main__":
    sys.exit(main())
