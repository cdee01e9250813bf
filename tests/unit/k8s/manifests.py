"""Offline access to the Kubernetes manifests under `k8s/` for the tests in this folder.

Owns: loading every manifest document, the CRD schemas in `tests/fixtures/k8s-schemas/`
(converted from OpenAPI v3 to JSON Schema the way the API server applies them), the serve
config embedded in the RayService, and small accessors for Ray pod templates. It needs no
cluster and no network. Does not own any assertion: the test modules do.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[3]
K8S_DIR = REPO_ROOT / "k8s"
SCHEMA_DIR = REPO_ROOT / "tests" / "fixtures" / "k8s-schemas"
SERVE_CONFIG_PATH = REPO_ROOT / "serve_config.yaml"
DASHBOARD_PATH = K8S_DIR / "monitoring" / "grafana-dashboard.json"

#: (apiVersion, kind) -> CRD file in SCHEMA_DIR.
CRD_FILES: dict[tuple[str, str], str] = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("ray.io/v1", "RayJob"): "",  # no CRD in the fixtures: see rayjob_schema()
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}

#: Kubernetes built-in kinds we ship; their schemas are not in the fixtures, so the tests check
#: their structure by hand.
CORE_KINDS: frozenset[tuple[str, str]] = frozenset(
    {
        ("v1", "Namespace"),
        ("v1", "Secret"),
        ("v1", "PersistentVolumeClaim"),
        ("v1", "ConfigMap"),
        ("v1", "Service"),
        ("batch/v1", "Job"),
    }
)

#: Labels KubeRay puts on every Ray pod it creates (in addition to the template's labels).
KUBERAY_NODE_TYPE_LABEL = "ray.io/node-type"

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int
    doc: dict[str, Any]

    @property
    def api_version(self) -> str:
        return self.doc.get("apiVersion", "")

    @property
    def kind(self) -> str:
        return self.doc.get("kind", "")

    @property
    def name(self) -> str:
        return (self.doc.get("metadata") or {}).get("name", "")

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(K8S_DIR)}#{self.index}:{self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def load_manifests() -> tuple[Manifest, ...]:
    """Every non-empty YAML document under k8s/ (raises on a YAML syntax error)."""
    out: list[Manifest] = []
    for path in manifest_files():
        with open(path, encoding="utf-8") as f:
            for index, doc in enumerate(yaml.load_all(f, Loader=_YAML_LOADER)):
                if doc is not None:
                    out.append(Manifest(path, index, doc))
    return tuple(out)


def manifests_of_kind(kind: str) -> list[Manifest]:
    return [m for m in load_manifests() if m.kind == kind]


def the_rayservice() -> dict[str, Any]:
    (rayservice,) = manifests_of_kind("RayService")
    return rayservice.doc


# ---------------------------------------------------------------------------------------------
# CRD schemas


def openapi_to_jsonschema(node: Any) -> Any:
    """Turn a CRD's structural OpenAPI v3 schema into a JSON Schema that validates like the API
    server with strict field validation: `x-kubernetes-int-or-string` means integer or string,
    other `x-kubernetes-*` keys are dropped, and objects that declare `properties` reject
    unknown fields unless marked `x-kubernetes-preserve-unknown-fields`."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: openapi_to_jsonschema(value)
        for key, value in node.items()
        if not key.startswith("x-kubernetes-")
    }
    if node.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    is_object = out.get("type") == "object" and isinstance(out.get("properties"), dict)
    if (
        is_object
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The JSON Schema of one served version of a CRD in the fixtures."""
    if kind == "RayJob":
        return rayjob_schema()
    group, _, version = api_version.rpartition("/")
    with open(SCHEMA_DIR / CRD_FILES[(api_version, kind)], encoding="utf-8") as f:
        crd = yaml.load(f, Loader=_YAML_LOADER)
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    return openapi_to_jsonschema(served["schema"]["openAPIV3Schema"])


#: The RayJob `spec` fields our manifests may use, typed as KubeRay's RayJob API documents them
#: (the RayJob CRD is not among the shared schemas; `rayClusterSpec` is checked against the
#: RayCluster CRD instead).
RAYJOB_SPEC_FIELDS: dict[str, dict[str, Any]] = {
    "entrypoint": {"type": "string", "minLength": 1},
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "backoffLimit": {"type": "integer", "minimum": 0},
    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "shutdownAfterJobFinishes": {"type": "boolean"},
    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
    "runtimeEnvYAML": {"type": "string"},
    "entrypointNumCpus": {"type": "number"},
    "entrypointNumGpus": {"type": "number"},
    "suspend": {"type": "boolean"},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
}


@functools.cache
def rayjob_schema() -> dict[str, Any]:
    """A strict JSON Schema for our RayJob manifests: the hand-typed top-level fields above, and
    `rayClusterSpec` exactly as the RayCluster CRD defines a RayCluster's `spec`."""
    cluster = crd_schema("ray.io/v1", "RayCluster")
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": cluster["properties"]["metadata"],
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec"],
                "additionalProperties": False,
                "properties": {**RAYJOB_SPEC_FIELDS, "rayClusterSpec": cluster["properties"]["spec"]},
            },
        },
    }


def validation_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Human-readable schema violations of `doc` (empty when it validates)."""
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


# ---------------------------------------------------------------------------------------------
# Serve config


def load_serve_config() -> dict[str, Any]:
    with open(SERVE_CONFIG_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def embedded_serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The RayService's `serveConfigV2` (a YAML string) parsed."""
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def the_application(serve_config: dict[str, Any]) -> dict[str, Any]:
    (application,) = serve_config["applications"]
    return application


# ---------------------------------------------------------------------------------------------
# Ray pods


@dataclass(frozen=True)
class RayGroup:
    """One Ray node group of the RayService (the head or a worker group)."""

    name: str
    spec: dict[str, Any]
    is_head: bool

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.spec["template"]["spec"]

    @property
    def pod_labels(self) -> dict[str, str]:
        labels = dict(self.spec["template"].get("metadata", {}).get("labels", {}))
        labels[KUBERAY_NODE_TYPE_LABEL] = "head" if self.is_head else "worker"
        return labels

    @property
    def ray_container(self) -> dict[str, Any]:
        # KubeRay treats the first container as the Ray container.
        return self.pod_spec["containers"][0]

    @property
    def rayStartParams(self) -> dict[str, str]:  # noqa: N802 (the manifest's key)
        return self.spec.get("rayStartParams", {})

    def limit(self, resource: str) -> str | int | None:
        return self.ray_container.get("resources", {}).get("limits", {}).get(resource)

    def request(self, resource: str) -> str | int | None:
        return self.ray_container.get("resources", {}).get("requests", {}).get(resource)

    @property
    def num_cpus(self) -> float:
        """Logical CPUs Ray advertises: `num-cpus` if set, else the container's CPU limit."""
        if "num-cpus" in self.rayStartParams:
            return float(self.rayStartParams["num-cpus"])
        return cpu_quantity(self.limit("cpu") or self.request("cpu") or 0)

    @property
    def num_gpus(self) -> int:
        if "num-gpus" in self.rayStartParams:
            return int(self.rayStartParams["num-gpus"])
        return int(self.limit("nvidia.com/gpu") or 0)

    @property
    def memory_bytes(self) -> int:
        return memory_quantity(self.limit("memory") or self.request("memory") or 0)


def ray_groups(rayservice: dict[str, Any]) -> list[RayGroup]:
    """The Ray node groups of a RayService (`rayClusterConfig`) or RayJob (`rayClusterSpec`)."""
    spec = rayservice["spec"]
    cluster = spec["rayClusterConfig"] if "rayClusterConfig" in spec else spec["rayClusterSpec"]
    groups = [RayGroup("head", cluster["headGroupSpec"], is_head=True)]
    groups += [RayGroup(w["groupName"], w, is_head=False) for w in cluster.get("workerGroupSpecs", [])]
    return groups


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner id, pod spec) of every pod any manifest creates (Ray groups and Jobs)."""
    for manifest in load_manifests():
        if manifest.kind in ("RayService", "RayJob"):
            for group in ray_groups(manifest.doc):
                yield f"{manifest.id}/{group.name}", group.pod_spec
        elif manifest.kind == "Job":
            yield manifest.id, manifest.doc["spec"]["template"]["spec"]


_CPU_RE = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEMORY_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # fmt: skip


def cpu_quantity(value: str | int | float) -> float:
    match = _CPU_RE.match(str(value))
    if match is None:
        raise ValueError(f"not a CPU quantity: {value!r}")
    number = float(match.group(1))
    return number / 1000 if match.group(2) == "m" else number


def memory_quantity(value: str | int) -> int:
    match = _MEMORY_RE.match(str(value))
    if match is None:
        raise ValueError(f"not a memory quantity: {value!r}")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


# ---------------------------------------------------------------------------------------------
# Project metadata


@functools.cache
def pyproject() -> dict[str, Any]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pinned_ray_version() -> str:
    """The exact Ray version pinned by the package (`ray[serve]==X`)."""
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.match(r"^ray(\[[^\]]*\])?==([0-9][0-9.]*)$", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml must pin ray with '=='")


def load_dashboard() -> dict[str, Any]:
    with open(DASHBOARD_PATH, encoding="utf-8") as f:
        return json.load(f)
