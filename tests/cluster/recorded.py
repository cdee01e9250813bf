"""`run_recorded`: run `tests/cluster/run.py` in a subprocess in its own process group.

Why a subprocess: a process is the driver of one Ray cluster at a time, and the other live
suites share a session-wide cluster in the pytest process (`serve_app` in tests/conftest.py).
The recording runs its own multi-node cluster as a separate driver, so both can be up at
once, in either order. When it ends (or times out), the whole process group is killed, so no
raylet of the fake nodes outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_recorded(profile: str, scenarios: list[str], out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run the scenarios in a fresh cluster (subprocess); return the recorded report."""
    work_dir = Path(tempfile.mkdtemp(prefix=f"cogvlm_cluster_{profile}_"))  # checkpoint, metrics, log
    log_path = work_dir / f"run_{profile}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [sys.executable, "-m", "tests.cluster.run", "--profile", profile, "--scenarios", ",".join(scenarios),
           "--out", str(out_dir), "--work-dir", str(work_dir)]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cluster run exceeded {timeout_s} s; log: {log_path}")
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the run's group only: its raylets and workers
            process.wait()
    report_path = out_dir / f"cluster_{profile}.json"
    if not report_path.exists():
        tail = log_path.read_text()[-3000:]
        pytest.fail(f"the cluster run wrote no report (exit {process.returncode}):\n{tail}")
    return json.loads(report_path.read_text())
