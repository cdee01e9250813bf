"""A multi-node Ray cluster on one machine, grown and shrunk by Ray's real autoscaler.

This is `ray.cluster_utils.AutoscalingCluster`'s recipe: a head node started with an autoscaling
config whose provider is `fake_multinode` (Ray's `FakeMultiNodeProvider`), so Ray's own monitor
process runs the standard autoscaler and launches or terminates worker raylets on this machine
when resource demand (a Serve replica asking for `GPU: 1`) cannot be placed. Nodes carry logical
`GPU` resources; the model runs with `device: cpu`.

Three things differ from `AutoscalingCluster.start()`, for a shared 2-core CI machine:

- it never runs `ray stop --force` (which kills every Ray process on the machine, including the
  session-wide test cluster and anyone else's), and it picks free ports instead of 6379/8265;
- the head is started in this process (`ray._private.node.Node`, as `Cluster.add_node` does), so
  `shutdown()` ends exactly the processes this cluster started: the worker raylets found by their
  node id, then the head's processes;
- the wheel does not ship `fake_multi_node/example.yaml`, so the base config is written here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ray.cluster_utils import AutoscalingCluster

from cogvlm_ray.serve.ports import free_port

logger = logging.getLogger(__name__)

T = TypeVar("T")

HEAD_NODE_TYPE = "ray.head.default"
FAKE_NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"

# The base of Ray's fake_multi_node/example.yaml (the cluster-level keys the autoscaler reads).
_BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": HEAD_NODE_TYPE,
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    is_head: bool
    resources: dict[str, float]
    metrics_export_port: int | None


class LocalAutoscalingCluster(AutoscalingCluster):
    """`AutoscalingCluster` without `ray stop --force` and without fixed ports (see module doc)."""

    def __init__(
        self,
        head_resources: dict[str, float],
        worker_node_types: dict[str, dict[str, Any]],
        *,
        idle_timeout_minutes: float = 0.1,
        upscaling_speed: float = 1.0,
        autoscaler_update_interval_s: int = 1,
    ):
        self._gcs_port = 0
        self.dashboard_port = 0
        self._update_interval_s = autoscaler_update_interval_s
        super().__init__(
            head_resources,
            worker_node_types,
            idle_timeout_minutes=idle_timeout_minutes,
            upscaling_speed=upscaling_speed,
        )
        self.head_node: Any = None
        self._config_path: str | None = None

    def _generate_config(
        self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False, **config_kwargs: Any
    ) -> dict[str, Any]:
        config = copy.deepcopy(_BASE_CONFIG)
        config["available_node_types"] = copy.deepcopy(worker_node_types)
        config["available_node_types"][HEAD_NODE_TYPE] = {
            "resources": dict(head_resources),
            "node_config": {},
            "max_workers": 0,
        }
        config.update(config_kwargs)
        return config

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    @property
    def gcs_address(self) -> str:
        assert self.head_node is not None, "start() first"
        return self.head_node.gcs_address

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, _system_config: dict[str, Any] | None = None, override_env: dict | None = None) -> str:
        """Start the head (and, through its monitor, the min_workers nodes); returns the GCS address."""
        import ray
        import ray._private.node
        import ray._private.parameter
        import ray._private.services

        self._gcs_port, self.dashboard_port = free_port(), free_port()  # fresh ones on every start
        node_ip = ray._private.services.get_node_ip_address()
        config = self.config
        config["provider"]["gcs_address"] = f"{node_ip}:{self._gcs_port}"
        fd, self._config_path = tempfile.mkstemp(prefix="fake_autoscaling_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        # The monitor (autoscaler) process inherits these: the fake provider refuses to run
        # without RAY_FAKE_CLUSTER, and the update interval sets how fast it reacts.
        os.environ["RAY_FAKE_CLUSTER"] = "1"
        os.environ["AUTOSCALER_UPDATE_INTERVAL_S"] = str(self._update_interval_s)
        os.environ.update(override_env or {})
        head = dict(self._head_resources)
        params = ray._private.parameter.RayParams(
            num_cpus=head.pop("CPU", 1),
            num_gpus=head.pop("GPU", 0),
            object_store_memory=head.pop("object_store_memory", 150 * 1024 * 1024),
            resources=head,
            gcs_server_port=self._gcs_port,
            include_dashboard=True,
            dashboard_port=self.dashboard_port,
            dashboard_agent_listen_port=0,
            min_worker_port=0,
            max_worker_port=0,
            autoscaling_config=self._config_path,
            _system_config=_system_config,
        )
        self.head_node = ray._private.node.Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
        ray._private.services.find_gcs_addresses.cache_clear()
        return self.head_node.gcs_address

    # -- inspection -------------------------------------------------------------------------

    @staticmethod
    def alive_nodes() -> list[NodeInfo]:
        """Alive nodes as the GCS reports them (needs a connected driver)."""
        import ray

        head_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        out = []
        for node in ray.nodes():
            if not node["Alive"]:
                continue
            resources = {k: float(v) for k, v in node["Resources"].items() if not k.startswith("node:")}
            is_head = "node:__internal_head__" in node["Resources"] or node["NodeID"] == head_id
            out.append(NodeInfo(node["NodeID"], is_head, resources, node.get("MetricsExportPort")))
        return out

    def worker_raylet_pids(self) -> dict[str, int]:
        """{node id: raylet pid} of this cluster's fake worker nodes: raylets whose command line
        names our GCS, with the node id the fake provider put in their environment."""
        if self.head_node is None:
            return {}
        gcs_flag = f"--gcs-address={self.gcs_address}".encode()
        pids: dict[str, int] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                if not cmdline or not cmdline[0].endswith(b"raylet") or gcs_flag not in cmdline:
                    continue
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(FAKE_NODE_ID_ENV.encode() + b"="):
                    pids[entry.split(b"=", 1)[1].decode()] = int(proc.name)
        return pids

    def kill_raylet(self, node_id: str) -> int:
        """SIGKILL the raylet of a worker node (node loss); returns its pid."""
        pid = self.worker_raylet_pids()[node_id]
        os.kill(pid, signal.SIGKILL)
        logger.info("killed raylet %d of node %s", pid, node_id)
        return pid

    # -- teardown ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End every process this cluster started, by pid: the worker raylets first (Serve
        replicas on them go too), then the head's processes, then any straggler among this
        process's descendants (agents and log monitors outlive their raylet otherwise)."""
        import psutil

        descendants = psutil.Process().children(recursive=True)
        for node_id, pid in self.worker_raylet_pids().items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                logger.info("stopped worker raylet %d (node %s)", pid, node_id)
        if self.head_node is not None:
            self.head_node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
            self.head_node = None
        for proc in descendants:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(descendants, timeout=10)
        if self._config_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._config_path)
            self._config_path = None


def wait_for(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.5, what: str = "condition"
) -> T:
    """Poll `predicate()` until it returns something truthy and return that; TimeoutError after
    `timeout_s`. Exceptions from the predicate (a node dying mid-query) count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:
            last_error = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s (last error: {last_error!r})")
        time.sleep(interval_s)
