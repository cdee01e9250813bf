"""The RayService carries the production serve config unchanged, and its cluster can run it.

The serve config side is read from `serve_config.yaml` at test time (never copied here), so a
change there that is not synced into `k8s/rayservice.yaml` (python k8s/sync_serve_config.py)
or that no longer fits the worker groups fails these tests.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
from typing import Any

import pytest

from cogvlm_ray.config import ModelConfig
from tests.unit.k8s.manifests import (
    K8S_DIR,
    REPO_ROOT,
    SERVE_CONFIG_PATH,
    RayGroup,
    cpu_quantity,
    embedded_serve_config,
    load_serve_config,
    manifests_of_kind,
    memory_quantity,
    pinned_ray_version,
    pyproject,
    ray_groups,
    the_application,
    the_rayservice,
)

# Ray Serve's defaults for settings a deployment may leave out (ray.serve.config.DeploymentConfig).
SERVE_DEFAULT_NUM_CPUS = 1.0
SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0
SERVE_DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 2.0
BYTES_PER_BF16 = 2


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return the_rayservice()


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    assert SERVE_CONFIG_PATH.is_file(), "serve_config.yaml (the production Serve config) is missing"
    return load_serve_config()


@pytest.fixture(scope="module")
def embedded(rayservice) -> dict[str, Any]:
    return embedded_serve_config(rayservice)


@pytest.fixture(scope="module")
def groups(rayservice) -> dict[str, RayGroup]:
    return {g.name: g for g in ray_groups(rayservice)}


def deployments(serve_config: dict[str, Any]) -> list[dict[str, Any]]:
    return the_application(serve_config).get("deployments", [])


def actor_options(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment.get("ray_actor_options") or {}


def num_gpus(deployment: dict[str, Any]) -> float:
    return float(actor_options(deployment).get("num_gpus", 0) or 0)


def num_cpus(deployment: dict[str, Any]) -> float:
    return float(actor_options(deployment).get("num_cpus", SERVE_DEFAULT_NUM_CPUS))


def max_replicas_during_update(deployment: dict[str, Any]) -> int:
    """max_replicas plus the rolling-update surge (Serve rounds the percentage up to whole replicas)."""
    surge_percent = int(deployment.get("max_surge_percent", 0))
    return max_replicas(deployment) + math.ceil(max_replicas(deployment) * surge_percent / 100)


def max_replicas(deployment: dict[str, Any]) -> int:
    autoscaling = deployment.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling["max_replicas"])
    replicas = deployment.get("num_replicas", 1)
    assert isinstance(replicas, int), (
        f"{deployment['name']}: num_replicas={replicas!r} needs autoscaling_config"
    )
    return replicas


def min_replicas(deployment: dict[str, Any]) -> int:
    autoscaling = deployment.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling.get("min_replicas", 1))
    return int(deployment.get("num_replicas", 1))


def model_deployment(serve_config: dict[str, Any]) -> dict[str, Any]:
    gpu = [d for d in deployments(serve_config) if num_gpus(d) > 0]
    assert len(gpu) == 1, "the production config must give GPUs to exactly one deployment (the model server)"
    return gpu[0]


def gpu_group(groups: dict[str, RayGroup]) -> RayGroup:
    (group,) = [g for g in groups.values() if g.num_gpus > 0]
    return group


def cpu_groups(groups: dict[str, RayGroup]) -> list[RayGroup]:
    return [g for g in groups.values() if not g.is_head and g.num_gpus == 0]


# ---------------------------------------------------------------------------------------------
# The embedded serve config is serve_config.yaml


def test_embedded_application_equals_serve_config(serve_config, embedded) -> None:
    """Same applications: import path, args, route, runtime_env and every deployment setting."""
    assert embedded["applications"] == serve_config["applications"], (
        "k8s/rayservice.yaml serveConfigV2 differs from serve_config.yaml: run python k8s/sync_serve_config.py"
    )
    app = the_application(embedded)
    assert app["import_path"] == "cogvlm_ray.serve.app:build_app"


def test_embedded_cluster_settings_differ_only_where_kubernetes_needs(serve_config, embedded) -> None:
    """Only the proxy placement and address may differ (0.0.0.0:8000 on every node, where
    KubeRay's Serve Service sends traffic); timeouts, logging etc. are the same."""
    local_http = dict(serve_config.get("http_options") or {})
    k8s_http = dict(embedded.get("http_options") or {})
    assert k8s_http.pop("host", None) == "0.0.0.0"
    assert k8s_http.pop("port", None) == 8000
    local_http.pop("host", None)
    local_http.pop("port", None)
    assert k8s_http == local_http
    assert embedded.get("proxy_location") == "EveryNode"
    ignored = {"applications", "http_options", "proxy_location"}
    assert {k: v for k, v in embedded.items() if k not in ignored} == {
        k: v for k, v in serve_config.items() if k not in ignored
    }


def test_sync_script_reproduces_the_manifest(serve_config) -> None:
    """`python k8s/sync_serve_config.py --check` would pass: the block is exactly what it writes."""
    spec = importlib.util.spec_from_file_location("sync_serve_config", K8S_DIR / "sync_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (K8S_DIR / "rayservice.yaml").read_text(encoding="utf-8")
    assert module.synced_text(text, serve_config) == text, "run python k8s/sync_serve_config.py"


def test_embedded_config_validates_against_ray_serve_schema(embedded) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(embedded)
    assert [app.name for app in schema.applications] == [a["name"] for a in embedded["applications"]]


def test_embedded_args_validate_against_app_args(embedded) -> None:
    from cogvlm_ray.serve.args import AppArgs

    app = the_application(embedded)
    args = AppArgs.model_validate(app.get("args") or {})
    assert args.device in ("cuda", "auto"), "the RayService gives the model GPUs; the app must use them"


def test_api_key_reaches_every_ray_pod(embedded, groups) -> None:
    """The ingress reads its key from the env var `api_key_env`; an ingress replica may be placed
    on any worker, so every group gets the variable from the (optional) Secret."""
    from cogvlm_ray.serve.args import AppArgs

    args = AppArgs.model_validate(the_application(embedded).get("args") or {})
    if args.api_key_env is None:
        pytest.skip("the production config does not read an API key from the environment")
    (secret,) = [m for m in manifests_of_kind("Secret") if args.api_key_env in m.doc.get("stringData", {})]
    for group in groups.values():
        env = {e["name"]: e for e in group.ray_container["env"]}
        ref = env[args.api_key_env]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret.name and ref["key"] == args.api_key_env, group.name


def test_deployment_names_exist_in_the_app(embedded) -> None:
    """Settings under `deployments:` apply by name; a misspelt name would fail the deploy, so
    check the names against the deployments serve/app.py defines."""
    from ray import serve

    from cogvlm_ray.serve import app as app_module

    defined = {obj.name for obj in vars(app_module).values() if isinstance(obj, serve.Deployment)}
    assert {d["name"] for d in deployments(embedded)} <= defined


# ---------------------------------------------------------------------------------------------
# Resources: the cluster fits the application


def test_head_runs_no_replicas(groups) -> None:
    head = groups["head"]
    assert head.rayStartParams["num-cpus"] == "0"
    assert head.num_gpus == 0


def test_gpu_per_pod_matches_model_replica(serve_config, groups) -> None:
    """One ModelServer replica per GPU pod: the pod's nvidia.com/gpu equals the replica's
    num_gpus, which is also what device_map shards the model over."""
    model = model_deployment(serve_config)
    gpu = gpu_group(groups)
    assert (
        gpu.limit("nvidia.com/gpu") == gpu.request("nvidia.com/gpu") or gpu.request("nvidia.com/gpu") is None
    )
    assert float(gpu.limit("nvidia.com/gpu")) == num_gpus(model)
    assert num_gpus(model) == int(num_gpus(model)), "fractional GPUs cannot hold a 39 GB model"
    if "num-gpus" in gpu.rayStartParams:
        assert int(gpu.rayStartParams["num-gpus"]) == int(gpu.limit("nvidia.com/gpu"))
    # Ray CPUs of a GPU pod = what its model replicas take, so CPU-only replicas stay off GPU nodes.
    assert gpu.num_cpus == num_cpus(model) * (gpu.num_gpus // int(num_gpus(model)))
    assert gpu.num_cpus <= cpu_quantity(gpu.limit("cpu")), "the pod must have the CPUs Ray advertises"
    for group in cpu_groups(groups):
        assert group.limit("nvidia.com/gpu") is None and group.request("nvidia.com/gpu") is None


def test_worker_groups_cover_serve_autoscaling(serve_config, groups) -> None:
    model = model_deployment(serve_config)
    gpu = gpu_group(groups)
    replicas_per_pod = gpu.num_gpus // int(num_gpus(model))
    assert replicas_per_pod >= 1
    assert gpu.spec["maxReplicas"] * replicas_per_pod >= max_replicas_during_update(model), (
        "the GPU worker group's maxReplicas cannot host ModelServer's max_replicas plus its rolling-update "
        "surge (a `serve deploy` at full scale would wait for GPUs forever)"
    )
    assert gpu.spec["minReplicas"] * replicas_per_pod >= min(min_replicas(model), 1), (
        "keep a GPU pod for the first model replica (a cold GPU node + 39 GB load takes minutes)"
    )
    for group in [g for g in groups.values() if not g.is_head]:
        assert group.spec["minReplicas"] <= group.spec["replicas"] <= group.spec["maxReplicas"], group.name


def test_cpu_deployments_fit_the_cpu_workers(serve_config, groups) -> None:
    """CPU fractions: each CPU deployment fits one CPU pod, and all their max replicas fit the
    CPU worker group at its maximum size."""
    cpu = cpu_groups(groups)
    assert cpu, "a CPU worker group hosts the ingress and the preprocessors"
    capacity = sum(g.spec["maxReplicas"] * g.num_cpus for g in cpu)
    largest_pod = max(g.num_cpus for g in cpu)
    demand = 0.0
    for deployment in deployments(serve_config):
        if num_gpus(deployment) > 0:
            continue
        assert num_cpus(deployment) <= largest_pod, f"{deployment['name']} needs more CPUs than a CPU pod has"
        memory = actor_options(deployment).get("memory")
        if memory:
            assert memory <= max(g.memory_bytes for g in cpu), deployment["name"]
        demand += num_cpus(deployment) * max_replicas_during_update(deployment)
    assert 0 < demand <= capacity, (
        f"CPU deployments need {demand} CPUs at max scale; CPU workers offer {capacity}"
    )


def _real_model_bf16_bytes() -> int:
    """bf16 size of the real checkpoint, from its config (the spec's parameter table)."""
    config = ModelConfig.from_pretrained(
        REPO_ROOT / "tests" / "fixtures" / "cogvlm2-tiny" / "real_config.json"
    )
    d, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = d + 2 * config.num_key_value_heads * config.head_dim
    per_layer = (
        2 * d  # norms
        + 2 * qkv * d
        + qkv  # language + vision QKV (vision with bias)
        + 2 * d * d  # language + vision dense
        + 2 * 3 * d * i  # language + vision MLP
        + config.head_dim // 2  # inv_freq buffer
    )
    vc = config.vision_config
    dv, iv = vc.hidden_size, vc.intermediate_size
    vision_layer = 3 * dv * dv + 3 * dv + dv * dv + dv + 2 * dv * iv + iv + dv + 4 * dv
    vision = (dv * vc.in_channels * vc.patch_size**2 + dv + dv + vc.num_positions * dv
              + vc.num_hidden_layers * vision_layer
              + 4 * dv * dv + dv  # 2x2 downsample conv
              + d * dv + 2 * d + 3 * d * i + 2 * d)  # GLU adapter + boi/eoi  # fmt: skip
    params = 2 * v * d + d + config.num_hidden_layers * per_layer + vision
    return params * BYTES_PER_BF16


def test_memory_sized_from_the_model(groups) -> None:
    weights = _real_model_bf16_bytes()
    assert 38e9 < weights < 40e9  # the published ~39 GB; guards the arithmetic above
    gpu = gpu_group(groups)
    object_store = int(gpu.rayStartParams["object-store-memory"])
    assert gpu.memory_bytes >= weights + object_store, (
        "GPU pods need host memory for the object store plus the checkpoint's page cache"
    )
    (pvc,) = manifests_of_kind("PersistentVolumeClaim")
    storage = memory_quantity(pvc.doc["spec"]["resources"]["requests"]["storage"])
    assert storage >= 1.5 * weights, (
        "the model cache must hold the bf16 checkpoint, the int4 one and a download"
    )
    for group in groups.values():
        shm = next(v for v in group.pod_spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert memory_quantity(shm["emptyDir"]["sizeLimit"]) >= int(
            group.rayStartParams["object-store-memory"]
        )
        assert group.memory_bytes >= 4 * int(group.rayStartParams["object-store-memory"]), group.name
        assert group.limit("memory") == group.request("memory"), (
            f"{group.name}: Ray sizes itself from the limit"
        )


# ---------------------------------------------------------------------------------------------
# Scheduling, autoscaling, lifecycle


def test_gpu_pods_tolerate_gpu_taints_and_select_gpu_nodes(groups) -> None:
    pod = gpu_group(groups).pod_spec
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists" for t in pod["tolerations"])
    assert pod["nodeSelector"], "the GPU group pins a GPU type (placeholder to adapt)"


def test_in_tree_autoscaling(rayservice, groups) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["resources"]["limits"] and options["resources"]["requests"]
    gpu = gpu_group(groups)
    for group in cpu_groups(groups):
        # Give GPU nodes longer before removal: bringing one back costs minutes of loading.
        assert gpu.spec["idleTimeoutSeconds"] >= group.spec["idleTimeoutSeconds"] > 0


def test_ray_version_and_image_match_the_package(rayservice) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == pinned_ray_version()
    images = {group.ray_container["image"] for group in ray_groups(rayservice)}
    images |= {
        c["image"]
        for job in manifests_of_kind("Job")
        for c in job.doc["spec"]["template"]["spec"]["containers"]
    }
    assert len(images) == 1, f"every Ray pod must run the same image: {images}"
    assert images.pop().endswith(":" + pyproject()["project"]["version"])


def _prestop_drain_deadline(group: RayGroup) -> int:
    command = group.ray_container["lifecycle"]["preStop"]["exec"]["command"]
    script = command[-1]
    assert "ray drain-node" in script
    words = shlex.split(script.split(";")[0])
    return int(words[words.index("--deadline-remaining-seconds") + 1])


def _serve_drain_seconds(deployment: dict[str, Any]) -> float:
    return float(
        deployment.get("graceful_shutdown_timeout_s", SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S)
    ) + float(deployment.get("graceful_shutdown_wait_loop_s", SERVE_DEFAULT_GRACEFUL_SHUTDOWN_WAIT_LOOP_S))


def test_graceful_termination_drains_streams(rayservice, serve_config, groups) -> None:
    """Pods leave through `ray drain-node` (Serve migrates replicas, open streams finish) and
    Kubernetes waits longer than the drain before killing them."""
    model = model_deployment(serve_config)
    longest_cpu_drain = max(_serve_drain_seconds(d) for d in deployments(serve_config) if num_gpus(d) == 0)
    for group in [g for g in groups.values() if not g.is_head]:
        deadline = _prestop_drain_deadline(group)
        needed = _serve_drain_seconds(model) if group.num_gpus else longest_cpu_drain
        assert deadline >= needed, (
            f"{group.name}: drain deadline {deadline}s < Serve graceful shutdown {needed}s"
        )
        assert group.pod_spec["terminationGracePeriodSeconds"] >= deadline + 30, group.name
    assert rayservice["spec"]["rayClusterDeletionDelaySeconds"] >= _serve_drain_seconds(model)
    # Streams still open on the old cluster when an upgrade switches traffic are cut when it is
    # deleted: keep it for the longest request the app allows.
    from cogvlm_ray.serve.args import AppArgs

    timeouts = [(serve_config.get("http_options") or {}).get("request_timeout_s"),
                AppArgs.model_validate(the_application(serve_config).get("args") or {}).request_timeout_s]  # fmt: skip
    longest_request = max((float(t) for t in timeouts if t), default=0.0)
    assert rayservice["spec"]["rayClusterDeletionDelaySeconds"] >= longest_request, (
        "the old cluster must outlive the longest request after an upgrade switches traffic"
    )


def test_readiness_waits_for_the_model(groups) -> None:
    """Workers are Ready only when the app's /health says model replicas are up; liveness never
    depends on the model (loading takes minutes and must not restart the pod)."""
    for group in [g for g in groups.values() if not g.is_head]:
        readiness = " ".join(group.ray_container["readinessProbe"]["exec"]["command"])
        liveness = " ".join(group.ray_container["livenessProbe"]["exec"]["command"])
        assert "localhost:8000/health" in readiness, group.name
        assert "8000" not in liveness, group.name
        assert "local_raylet_healthz" in readiness and "local_raylet_healthz" in liveness


def test_health_route_is_served_by_the_ingress() -> None:
    source = (REPO_ROOT / "cogvlm_ray" / "serve" / "ingress.py").read_text(encoding="utf-8")
    assert re.search(r"""\.(get|api_route)\(\s*["']/health["']""", source), "the probes call GET /health"


def test_model_cache_and_token_in_every_ray_pod(groups) -> None:
    (pvc,) = manifests_of_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc.doc["spec"]["accessModes"], "GPU pods on several nodes share the cache"
    for group in groups.values():
        container = group.ray_container
        env = {e["name"]: e for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group.pod_spec["volumes"]}
        cache_volume = next(
            n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == pvc.name
        )
        assert env["HF_HOME"]["value"].startswith(mounts[cache_volume].rstrip("/") + "/"), group.name
        token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["optional"] is True and "value" not in env["HF_TOKEN"]


def test_gpu_layout_documented_matches_the_manifest(serve_config, groups) -> None:
    """docs/kubernetes.md states the layout this manifest uses (GPUs per replica)."""
    doc = (REPO_ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    per_replica = int(num_gpus(model_deployment(serve_config)))
    assert f"nvidia.com/gpu: {per_replica}" in doc
    assert math.isclose(gpu_group(groups).num_gpus, per_replica)


def test_download_job_fetches_the_served_model(embedded) -> None:
    """The pre-download Job fills the cache with the checkpoint the app loads, in the same HF_HOME."""
    from cogvlm_ray.serve.args import AppArgs

    args = AppArgs.model_validate(the_application(embedded).get("args") or {})
    (job,) = manifests_of_kind("Job")
    (container,) = job.doc["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODEL_ID"] == args.model
    ray_hf_home = {
        g.name: next(e["value"] for e in g.ray_container["env"] if e["name"] == "HF_HOME")
        for g in ray_groups(the_rayservice())
    }
    assert set(ray_hf_home.values()) == {env["HF_HOME"]}


def test_operator_level_rules(rayservice, groups) -> None:
    """Rules KubeRay enforces in the operator rather than in the CRD schema."""
    assert rayservice["spec"]["upgradeStrategy"]["type"] in {
        "NewCluster",
        "None",
        "NewClusterWithIncrementalUpgrade",
    }
    names = [g.name for g in groups.values() if not g.is_head]
    assert len(names) == len(set(names)) and all(
        re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names
    )
    for group in groups.values():
        assert group.ray_container["image"] and group.pod_spec["containers"][0] is group.ray_container
        assert all(isinstance(v, str) for v in group.rayStartParams.values()), (
            f"{group.name}: rayStartParams are strings"
        )
