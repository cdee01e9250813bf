"""The batch RayJob (k8s/batch-rayjob.yaml): its entrypoint is a valid batch command, and its
cluster fits what that command asks for (GPUs and CPUs per engine actor, autoscaling room, the
same image, Ray version and volumes as the RayService). CRD validation is in test_schemas.py."""

from __future__ import annotations

import copy
import shlex

import pytest

from cogvlm_ray.batch.cli import build_parser, options_from
from tests.unit.k8s.manifests import (
    crd_schema,
    manifests_of_kind,
    ray_groups,
    the_rayservice,
    validation_errors,
)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (manifest,) = manifests_of_kind("RayJob")
    return manifest.doc


@pytest.fixture(scope="module")
def options(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "cogvlm_ray.batch"]
    return options_from(build_parser().parse_args(argv[3:]))


def _group(doc: dict, name: str):
    (group,) = [g for g in ray_groups(doc) if g.name == name]
    return group


def test_entrypoint_is_a_valid_batch_command(options) -> None:
    assert options.app.device == "cuda" and options.app.model == the_rayservice_args()["model"]
    assert options.sizing.num_gpus_per_actor == 1 and options.sizing.max_actors > options.sizing.min_actors


def the_rayservice_args() -> dict:
    import yaml

    return yaml.safe_load(the_rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"]


def test_gpu_pods_fit_one_engine_actor_each(rayjob, options) -> None:
    gpu = _group(rayjob, "gpu")
    assert gpu.num_gpus == options.sizing.num_gpus_per_actor
    assert gpu.num_cpus == options.sizing.num_cpus_per_actor  # no preprocessing task lands on a GPU pod
    assert gpu.spec["maxReplicas"] >= options.sizing.max_actors
    assert rayjob["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert _group(rayjob, "head").num_cpus == 0  # the driver only; tasks and actors run on workers


def test_same_image_version_and_volumes_as_the_rayservice(rayjob, options) -> None:
    service = the_rayservice()
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == service["spec"]["rayClusterConfig"]["rayVersion"]
    images = {c["image"] for g in ray_groups(rayjob) for c in g.pod_spec["containers"]}
    assert images == {c["image"] for g in ray_groups(service) for c in g.pod_spec["containers"]}
    for group in ray_groups(rayjob):
        mounts = {m["mountPath"] for m in group.ray_container["volumeMounts"]}
        assert any(options.input.path.startswith(m) and options.output.startswith(m) for m in mounts), (
            group.name
        )
        env = {e["name"]: e for e in group.ray_container["env"]}
        assert env["HF_HOME"]["value"] == "/models/hf"


def test_validator_catches_a_broken_rayjob(rayjob) -> None:
    schema = crd_schema("ray.io/v1", "RayJob")
    assert validation_errors(rayjob, schema) == []
    for mutate, expected in [
        (lambda d: d["spec"].update(entrypoint=["python", "-m"]), "entrypoint"),
        (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="4"), "maxReplicas"),
    ]:
        doc = copy.deepcopy(rayjob)
        mutate(doc)
        errors = validation_errors(doc, schema)
        assert errors and any(expected in e for e in errors), errors
