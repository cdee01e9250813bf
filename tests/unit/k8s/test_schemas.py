"""Every manifest under k8s/ parses and validates: custom resources against their CRD schema
(tests/fixtures/k8s-schemas, strict about unknown fields), built-in kinds against hand-written
structural schemas; names referenced across manifests exist."""

from __future__ import annotations

import copy
import re

import pytest

from tests.unit.k8s.manifests import (
    CORE_KINDS,
    CRD_FILES,
    crd_schema,
    load_manifests,
    manifest_files,
    manifests_of_kind,
    pod_templates,
    the_rayservice,
    validation_errors,
)

MANIFESTS = load_manifests()
CUSTOM = [m for m in MANIFESTS if (m.api_version, m.kind) in CRD_FILES]
CORE = [m for m in MANIFESTS if (m.api_version, m.kind) in CORE_KINDS]


def test_manifests_exist_and_parse() -> None:
    kinds = {m.kind for m in MANIFESTS}
    assert {"RayService", "PodMonitor", "PrometheusRule", "PersistentVolumeClaim", "Secret"} <= kinds
    # Every file holds at least one document (an empty file would silently apply nothing).
    assert {m.path for m in MANIFESTS} == set(manifest_files())


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.id)
def test_every_manifest_has_a_known_kind(manifest) -> None:
    assert (manifest.api_version, manifest.kind) in set(CRD_FILES) | CORE_KINDS, (
        f"{manifest.id}: no schema check for {manifest.api_version} {manifest.kind}; add its CRD to "
        "tests/fixtures/k8s-schemas or a structural schema below"
    )
    assert manifest.name, f"{manifest.id}: metadata.name is required"


@pytest.mark.parametrize("manifest", CUSTOM, ids=lambda m: m.id)
def test_custom_resource_validates_against_its_crd(manifest) -> None:
    errors = validation_errors(manifest.doc, crd_schema(manifest.api_version, manifest.kind))
    assert not errors, f"{manifest.id}:\n" + "\n".join(errors)


def _rayservice_schema():
    return crd_schema("ray.io/v1", "RayService")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParam={}), "rayStartParam"),
        (
            lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="many"),
            "maxReplicas",
        ),
        (
            lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"].update(upscalingMode="Fast"),
            "upscalingMode",
        ),
        (lambda d: d["spec"].update(serveConfigV2={"applications": []}), "serveConfigV2"),
        (
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop(
                "name"
            ),
            "containers",
        ),
    ],
    ids=["unknown-field", "int-field-as-word", "bad-enum", "serve-config-not-a-string", "missing-required"],
)
def test_validator_catches_broken_rayservice(mutate, expected: str) -> None:
    """The schema check is not vacuous: typical mistakes are reported, at the right place."""
    doc = copy.deepcopy(the_rayservice())
    mutate(doc)
    errors = validation_errors(doc, _rayservice_schema())
    assert errors and any(expected in e for e in errors), errors


def test_validator_accepts_int_or_string_quantities() -> None:
    doc = copy.deepcopy(the_rayservice())
    resources = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resources"
    ]
    resources["limits"]["cpu"] = 2
    resources["requests"]["cpu"] = "1500m"
    assert validation_errors(doc, _rayservice_schema()) == []


def test_validator_catches_broken_monitoring() -> None:
    (rule,) = manifests_of_kind("PrometheusRule")
    doc = copy.deepcopy(rule.doc)
    doc["spec"]["groups"][0]["rules"][0]["expresion"] = doc["spec"]["groups"][0]["rules"][0].pop("expr")
    assert validation_errors(doc, crd_schema(rule.api_version, rule.kind))
    monitor = manifests_of_kind("PodMonitor")[0]
    doc = copy.deepcopy(monitor.doc)
    doc["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    assert validation_errors(doc, crd_schema(monitor.api_version, monitor.kind))


# ---------------------------------------------------------------------------------------------
# Built-in kinds: structural schemas (the fields we rely on, typed; unknown top-level keys fail).

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"}


def _object(required: list[str], properties: dict, extra: bool = False) -> dict:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": extra}


_METADATA = _object(["name"], {"name": _NAME, "namespace": _NAME, "labels": {"type": "object"},
                               "annotations": {"type": "object"}})  # fmt: skip
_NAMESPACED_METADATA = {**_METADATA, "required": ["name", "namespace"]}
_CONTAINER = _object(
    ["name", "image"], {"name": _NAME, "image": {"type": "string", "minLength": 1}}, extra=True
)
_POD_SPEC = _object(
    ["containers"],
    {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
     "restartPolicy": {"enum": ["Never", "OnFailure"]}},
    extra=True,
)  # fmt: skip

CORE_SCHEMAS: dict[str, dict] = {
    "Namespace": _object(
        ["apiVersion", "kind", "metadata"], {"apiVersion": {}, "kind": {}, "metadata": _METADATA}
    ),  # fmt: skip
    "Secret": _object(
        ["apiVersion", "kind", "metadata", "type"],
        {
            "apiVersion": {},
            "kind": {},
            "metadata": _NAMESPACED_METADATA,
            "type": {"const": "Opaque"},
            "stringData": {"type": "object", "additionalProperties": {"type": "string"}},
            "data": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    ),  # fmt: skip
    "PersistentVolumeClaim": _object(
        ["apiVersion", "kind", "metadata", "spec"],
        {
            "apiVersion": {},
            "kind": {},
            "metadata": _NAMESPACED_METADATA,
            "spec": _object(
                ["accessModes", "resources"],
                {
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]
                        },
                    },
                    "storageClassName": {"type": "string"},
                    "volumeMode": {"enum": ["Filesystem", "Block"]},
                    "resources": _object(
                        ["requests"], {"requests": _object(["storage"], {"storage": _QUANTITY})}
                    ),
                },
            ),
        },
    ),  # fmt: skip
    "ConfigMap": _object(
        ["apiVersion", "kind", "metadata"],
        {
            "apiVersion": {},
            "kind": {},
            "metadata": _NAMESPACED_METADATA,
            "data": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    ),  # fmt: skip
    "Service": _object(
        ["apiVersion", "kind", "metadata", "spec"],
        {
            "apiVersion": {},
            "kind": {},
            "metadata": _NAMESPACED_METADATA,
            "spec": _object(["ports"], {"ports": {"type": "array", "minItems": 1}}, extra=True),
        },
    ),
    "Job": _object(
        ["apiVersion", "kind", "metadata", "spec"],
        {
            "apiVersion": {},
            "kind": {},
            "metadata": _NAMESPACED_METADATA,
            "spec": _object(
                ["template"],
                {
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "template": _object(
                        ["spec"],
                        {
                            "metadata": {"type": "object"},
                            "spec": {**_POD_SPEC, "required": ["containers", "restartPolicy"]},
                        },
                    ),
                },
            ),
        },
    ),  # fmt: skip
}


@pytest.mark.parametrize("manifest", CORE, ids=lambda m: m.id)
def test_core_manifest_structure(manifest) -> None:
    errors = validation_errors(manifest.doc, CORE_SCHEMAS[manifest.kind])
    assert not errors, f"{manifest.id}:\n" + "\n".join(errors)


def test_core_structure_check_is_not_vacuous() -> None:
    (pvc,) = manifests_of_kind("PersistentVolumeClaim")
    doc = copy.deepcopy(pvc.doc)
    doc["spec"]["accessModes"] = ["ReadWriteAlways"]
    doc["spec"]["resources"]["requests"]["storage"] = "200 gigs"
    assert len(validation_errors(doc, CORE_SCHEMAS["PersistentVolumeClaim"])) == 2


_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def test_secrets_are_templates_without_real_tokens() -> None:
    secrets = manifests_of_kind("Secret")
    assert secrets
    for secret in secrets:
        assert "data" not in secret.doc, f"{secret.id}: ship stringData placeholders, not encoded data"
        for key, value in secret.doc["stringData"].items():
            assert not _TOKEN_LIKE.search(value), f"{secret.id}: {key} looks like a real token"
            assert "REPLACE" in value, f"{secret.id}: {key} must be an obvious placeholder"
    for path in {m.path for m in load_manifests()}:
        assert not _TOKEN_LIKE.search(path.read_text(encoding="utf-8")), f"{path}: looks like a real HF token"


def test_namespaced_objects_share_the_shipped_namespace() -> None:
    (namespace,) = manifests_of_kind("Namespace")
    for manifest in load_manifests():
        if manifest.kind != "Namespace":
            assert manifest.doc["metadata"].get("namespace") == namespace.name, manifest.id


def test_pod_references_resolve() -> None:
    """Every PVC and Secret key a pod uses is shipped in k8s/ (a typo would leave pods Pending)."""
    claims = {m.name for m in manifests_of_kind("PersistentVolumeClaim")}
    secret_keys = {(m.name, key) for m in manifests_of_kind("Secret") for key in m.doc.get("stringData", {})}
    checked = 0
    for owner, pod_spec in pod_templates():
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        for container in pod_spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{owner}: mount of undeclared volume {mount['name']}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert (ref["name"], ref["key"]) in secret_keys, f"{owner}: secret {ref} is not shipped"
                    checked += 1
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{owner}: unknown PVC"
                checked += 1
    assert checked > 0
