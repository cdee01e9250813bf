"""Names of the metrics Ray itself exports, read from the installed Ray's source.

Alerts and dashboards may use Ray Serve's built-in `ray_serve_*` metrics and Ray's node
metrics (`ray_node_*`). Instead of a hand-kept list, this module reads the metric definitions
(`metrics.Counter/Gauge/Histogram("name", ..., tag_keys=...)`) from the Ray package the project
pins, so a metric Ray renames or drops fails the monitoring tests. Ray publishes each as
`ray_<name>` (+ `_total` for counters, `_bucket/_sum/_count` for histograms).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

RAY_PREFIX = "ray_"
_KIND_SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
# f-string metric names in Ray Serve are formatted with the request protocol.
_PROTOCOLS = ("http", "grpc")


@dataclass
class RayMetrics:
    exported_names: set[str] = field(default_factory=set)
    """Sample names as scraped from Ray's exporter, e.g. ray_serve_num_http_requests_total."""
    tag_keys: set[str] = field(default_factory=set)
    """Every tag key those metrics declare."""


def _source_files() -> list[Path]:
    import ray

    root = Path(ray.__file__).parent
    serve = [p for p in (root / "serve").rglob("*.py") if "tests" not in p.parts]
    return [*serve, root / "dashboard" / "modules" / "reporter" / "reporter_agent.py"]


def _names(node: ast.expr | None) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        names = []
        for protocol in _PROTOCOLS:
            parts = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts.append(str(value.value))
                elif isinstance(value, ast.FormattedValue):
                    parts.append(protocol)
            names.append("".join(parts))
        return names
    return []


def _string_constants(node: ast.expr | None) -> set[str]:
    if isinstance(node, (ast.Tuple, ast.List)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


@functools.cache
def ray_builtin_metrics() -> RayMetrics:
    out = RayMetrics()
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if kind not in _KIND_SUFFIXES:
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            name_node = node.args[0] if node.args else keywords.get("name")
            for name in _names(name_node):
                out.exported_names |= {RAY_PREFIX + name + suffix for suffix in _KIND_SUFFIXES[kind]}
            out.tag_keys |= _string_constants(keywords.get("tag_keys"))
            if len(node.args) >= 4:  # reporter_agent: Gauge(name, description, unit, tags)
                out.tag_keys |= _string_constants(node.args[3])

    from ray.dashboard import consts

    out.tag_keys |= set(consts.NODE_TAG_KEYS) | set(consts.GPU_TAG_KEYS)
    return out
