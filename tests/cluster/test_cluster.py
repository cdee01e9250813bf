"""The autoscaling chain on a live multi-node Ray cluster (fake GPU nodes, Ray's real autoscaler).

- `test_scale_up_and_down_smoke` (default run, ~2 min): 1 -> 2 ModelServer replicas under a
  streaming burst, the autoscaler adding the GPU node, 429 capacity following the replica count,
  then back to 1 replica and 1 node with the removed replica draining its streams.
- `test_full_scenarios` (`-m "cluster and slow"`): 1 -> 3 -> 1, node loss (a raylet killed by
  pid), rolling update with `serve deploy`; records bench/results/cluster/ when
  COGVLM_CLUSTER_RECORD=1 (the run behind docs/BENCHMARKS.md), else a temp dir.

Each test judges one recording with `tests/cluster/checks.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.cluster import checks
from tests.cluster.app_config import ClusterAppSpec
from tests.cluster.recorded import REPO, run_recorded
from tests.cluster.run import trimmed

pytestmark = [pytest.mark.cluster]

MAX_NUM_SEQS = ClusterAppSpec.max_num_seqs


def _explain(figures: dict, failures: list[str]) -> str:
    return "\n".join(failures) + "\nfigures: " + json.dumps(figures, default=str)


@pytest.mark.timeout(450)
def test_scale_up_and_down_smoke(tmp_path: Path):
    report = run_recorded("smoke", ["scale"], tmp_path, timeout_s=420)
    figures, failures = checks.check_scale(report)
    assert not failures, _explain(figures, failures)
    assert figures["lost"] == 0
    assert (tmp_path / "cluster_smoke.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_scenarios(tmp_path: Path):
    record = os.environ.get("COGVLM_CLUSTER_RECORD") == "1"
    out_dir = REPO / "bench" / "results" / "cluster" if record else tmp_path
    report = run_recorded("full", ["scale", "node_loss", "rolling_update"], out_dir, timeout_s=1470)
    results = {
        "scale": checks.check_scale(report),
        "node_loss": checks.check_node_loss(report, MAX_NUM_SEQS),
        "rolling_update": checks.check_rolling_update(report),
    }
    figures = {name: figures for name, (figures, _) in results.items()}
    (out_dir / "cluster_full_figures.json").write_text(json.dumps(figures, indent=1))
    if record:  # keep the timeline and summaries, not every request's result
        (out_dir / "cluster_full.json").write_text(json.dumps(trimmed(report), indent=1, default=str))
    problems = {name: failures for name, (_, failures) in results.items() if failures}
    assert not problems, json.dumps({"problems": problems, "figures": {n: f for n, (f, _) in results.items()}},
                                    indent=1, default=str)  # fmt: skip
