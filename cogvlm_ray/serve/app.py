"""The Ray Serve application: three deployments and `build_app(args)`.

    HTTP -> Ingress (FastAPI, CPU) --prepare--> Preprocessor (CPU)
                 \\                                   | PreparedPrompt (uint8 image, object store)
                  `--generate(stream)------------> ModelServer (GPU: engine, continuous batching)

This is the one module with `serve.deployment(...)`, `.bind(...)` and the app builder named in
`serve_config*.yaml` (`import_path: cogvlm_ray.serve.app:build_app`). `args:` in those files
must validate against `AppArgs` (unknown keys are rejected), and it is the only module that
reads environment variables. Deployment options set here (`max_ongoing_requests` = engine
batch size, queue bounds, CPUs) are defaults; the config file's `deployments:` section
overrides them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cogvlm_ray.api.chat import ChatDefaults
from cogvlm_ray.serve.backend import RayChatBackend
from cogvlm_ray.serve.ingress import IngressSettings, create_app
from cogvlm_ray.serve.metrics import cleanup_dead_processes, get_metrics
from cogvlm_ray.serve.model_source import is_tiny_random, resolve_model_path
from cogvlm_ray.serve.router import ROUTER_CLASS_PATH
from cogvlm_ray.serve.server import ModelServer, PreprocessServer

logger = logging.getLogger(__name__)

PREPROCESSOR = "Preprocessor"
MODEL_SERVER = "ModelServer"
INGRESS = "Ingress"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Args):
    """Mirrors `cogvlm_ray.engine.EngineConfig` (see docs/engine.md)."""

    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(4096, ge=1)
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_fraction: float = Field(0.85, gt=0.0, le=1.0)
    max_kv_tokens: int | None = Field(None, ge=1)
    image_cache_bytes: int = Field(1 << 30, ge=0)
    max_waiting: int = Field(256, ge=1)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    max_model_len: int | None = Field(None, ge=2)


class PreprocessArgs(_Args):
    """A subset of `cogvlm_ray.preprocess.PreprocessOptions` (see docs/preprocessing.md)."""

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    allow_http: bool = False
    http_allowed_hosts: tuple[str, ...] = ()
    allow_local_files: bool = False
    local_files_dir: str | None = None


class RoutingArgs(_Args):
    """How ingress replicas pick a ModelServer replica (see docs/routing.md)."""

    policy: Literal["image_affinity", "power_of_two"] = "image_affinity"
    """image_affinity: requests about one image go to the replica caching it (`serve/router.py`);
    power_of_two: Serve's default router."""
    max_load_imbalance: int = Field(4, ge=0)
    """Leave an image's home replica when it has more than this many ongoing requests above the
    least loaded replica."""
    max_affinity_candidates: int = Field(2, ge=1)
    """Rendezvous choices to try (home, second choice, ...) before load-based choice."""


class AppArgs(_Args):
    """`args:` of the Serve config. Every field is documented in docs/serving.md."""

    model: str = "THUDM/cogvlm2-llama3-chat-19B"
    """Hugging Face hub id, local checkpoint directory, or "tiny-random[:preset]" (random weights)."""
    served_model_name: str | None = None
    """The `model` name clients send; default: the last path component of `model`."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    quantization: Literal["none", "bnb-4bit", "bnb-8bit", "int8-wo", "int8-dq", "fp8"] = "none"
    """Quantize a float checkpoint at load (docs/quantization.md). "none" serves the checkpoint as
    stored, which also serves the official int4 checkpoint (its config says it is quantized)."""
    quantize_vision: bool = True
    """With `quantization`: also quantize the vision tower (false keeps it in `dtype`)."""
    cache_dir: str = "~/.cache/cogvlm_ray"
    """Where "tiny-random" checkpoints are created (hub downloads use HF_HOME)."""
    engine: EngineArgs = EngineArgs()
    preprocess: PreprocessArgs = PreprocessArgs()
    default_max_tokens: int = Field(1024, ge=1)
    default_temperature: float = Field(1.0, ge=0.0, le=2.0)
    default_top_p: float = Field(1.0, gt=0.0, le=1.0)
    api_key: str | None = Field(None, min_length=1)
    """Require `Authorization: Bearer <key>` on /v1/*. Prefer `api_key_env` outside demos."""
    api_key_env: str | None = "COGVLM_API_KEY"
    """Name of an environment variable (in the Ingress replica) holding the API key, if set there."""
    max_queued_requests: int = Field(64, ge=-1)
    """ModelServer queue bound per ingress replica beyond its running batch: past it, HTTP 429
    (-1: unbounded). The running batch per replica is `engine.max_num_seqs`."""
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    request_timeout_s: float | None = Field(600.0, gt=0)
    metrics_dir: str = "/tmp/cogvlm_ray_metrics"
    """PROMETHEUS_MULTIPROC_DIR for every replica (an env var of that name wins)."""
    ray_metrics: bool = True
    """Also record the metrics through ray.serve.metrics (Ray's per-node exporter, `ray_` prefix)."""
    stream_interval_s: float = Field(0.0, ge=0.0, le=1.0)
    """0: one streamed message per engine step. > 0: after the first token, at most one message
    per interval per request, carrying every token made meanwhile (cuts the per-message CPU cost
    of Ray, the proxy and SSE; see serve/streaming.py)."""
    shutdown_timeout_s: float = Field(30.0, ge=0)
    """How long a stopping model replica lets in-flight requests finish before aborting them."""
    fail_fast_without_replicas: bool = True
    """Answer 503 at once when no model replica is RUNNING (set false if min_replicas is 0)."""
    playground: bool = False
    """Serve the browser playground at `/`."""
    routing: RoutingArgs = RoutingArgs()

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]


def _metrics(args: AppArgs) -> Any:
    """This process's metrics, in multiprocess mode under the shared directory."""
    directory = os.environ.setdefault(METRICS_DIR_ENV, os.path.expanduser(args.metrics_dir))
    return get_metrics(multiprocess_dir=directory, use_ray=args.ray_metrics)


def _model_dir(args: AppArgs, *, weights: bool = True) -> Path:
    return resolve_model_path(args.model, os.path.expanduser(args.cache_dir), weights=weights)


@serve.deployment(name=PREPROCESSOR, max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class PreprocessorDeployment:
    """CPU: OpenAI messages -> PreparedPrompt (tokenizer and config loaded once per replica)."""

    def __init__(self, raw_args: dict[str, Any]):
        from cogvlm_ray.serve.factories import make_preprocessor

        args = AppArgs.model_validate(raw_args)
        model_dir = _model_dir(args, weights=False)
        self.server = PreprocessServer(make_preprocessor(args, model_dir), metrics=_metrics(args))

    async def prepare(
        self, messages: list[dict[str, Any]], max_tokens: int, template_version: str | None
    ) -> Any:
        return await self.server.prepare(messages, max_tokens, template_version)


@serve.deployment(
    name=MODEL_SERVER,
    max_ongoing_requests=32,
    max_queued_requests=64,
    graceful_shutdown_timeout_s=60,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class ModelDeployment:
    """GPU (or CPU): one continuous-batching engine per replica."""

    async def __init__(self, raw_args: dict[str, Any]):
        from cogvlm_ray.serve.factories import load_engine

        args = AppArgs.model_validate(raw_args)
        model_dir = _model_dir(args)
        self.server = ModelServer(
            lambda: load_engine(args, model_dir),
            metrics=_metrics(args),
            shutdown_timeout_s=args.shutdown_timeout_s,
            stream_interval_s=args.stream_interval_s,
        )
        await self.server.start()

    async def generate(
        self, prepared: Any, sampling_params: Any, request_id: str, affinity_key: str | None = None
    ) -> Any:
        # `affinity_key` is read by the request router (serve/router.py) in the caller, not here.
        async for output in self.server.generate(prepared, sampling_params, request_id):
            yield output

    def get_stats(self) -> Any:
        return self.server.get_stats()

    def get_replica_stats(self) -> tuple[str, Any]:
        """(this replica's id, its EngineStats): lets tests and benchmarks tell replicas apart."""
        return serve.get_replica_context().replica_id.unique_id, self.server.get_stats()

    def check_health(self) -> None:
        self.server.check_health()

    async def __del__(self) -> None:
        await self.server.shutdown()


@serve.deployment(name=INGRESS, max_ongoing_requests=512, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class IngressDeployment:
    """CPU: the OpenAI HTTP API (FastAPI, built in `__serve_build_asgi_app__`)."""

    def __init__(self, raw_args: dict[str, Any], preprocessor: Any, model: Any):
        args = AppArgs.model_validate(raw_args)
        api_key = args.api_key or (os.environ.get(args.api_key_env) if args.api_key_env else None) or None
        self.settings = IngressSettings(
            served_model_names=(args.model_name,),
            model_root=args.model,
            max_model_len=args.engine.max_model_len,
            api_key=api_key,
            max_request_bytes=args.max_request_bytes,
            request_timeout_s=args.request_timeout_s,
            defaults=ChatDefaults(
                max_tokens=args.default_max_tokens,
                temperature=args.default_temperature,
                top_p=args.default_top_p,
            ),
            playground=args.playground,
        )
        app_name = serve.get_replica_context().app_name
        self.backend = RayChatBackend(
            preprocessor,
            model,
            app_name=app_name,
            deployment_names=(MODEL_SERVER, PREPROCESSOR),
            max_num_seqs=args.engine.max_num_seqs,
            max_queued_requests=args.max_queued_requests,
            fail_fast_without_replicas=args.fail_fast_without_replicas,
        )
        self.metrics = _metrics(args)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.backend, self.settings, self.metrics)


def parse_args(args: dict[str, Any] | AppArgs | None) -> AppArgs:
    """Validate `args:` from the Serve config; ValueError with every problem listed."""
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"invalid cogvlm_ray app args: {problems}") from None


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The Serve application (the config's `import_path` target)."""
    app_args = parse_args(args)
    _prepare_metrics_dir(app_args)
    _check_gpus(app_args)
    raw = app_args.model_dump(mode="json")
    env = {
        "env_vars": {
            METRICS_DIR_ENV: os.environ.get(METRICS_DIR_ENV, os.path.expanduser(app_args.metrics_dir))
        }
    }
    preprocessor = PreprocessorDeployment.options(ray_actor_options={"num_cpus": 1, "runtime_env": env}).bind(
        raw
    )
    model = ModelDeployment.options(
        max_ongoing_requests=app_args.engine.max_num_seqs,
        max_queued_requests=app_args.max_queued_requests,
        ray_actor_options={"num_cpus": 1, "runtime_env": env},
        graceful_shutdown_timeout_s=app_args.shutdown_timeout_s + 5,
        request_router_config=_request_router_config(app_args),
    ).bind(raw)
    return IngressDeployment.options(ray_actor_options={"num_cpus": 1, "runtime_env": env}).bind(
        raw, preprocessor, model
    )


def _request_router_config(args: AppArgs) -> RequestRouterConfig:
    """ModelServer routing: the image-affinity router (serve/router.py) or Serve's default."""
    if args.routing.policy == "power_of_two":
        return RequestRouterConfig()
    metrics_dir = os.environ.get(METRICS_DIR_ENV, os.path.expanduser(args.metrics_dir))
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASS_PATH,
        request_router_kwargs={
            "max_load_imbalance": args.routing.max_load_imbalance,
            "max_affinity_candidates": args.routing.max_affinity_candidates,
            "metrics_dir": metrics_dir,
            "ray_metrics": args.ray_metrics,
        },
    )


def _prepare_metrics_dir(args: AppArgs) -> None:
    """Create the multiprocess metrics directory on this node and drop files of dead processes."""
    directory = os.environ.get(METRICS_DIR_ENV, os.path.expanduser(args.metrics_dir))
    os.makedirs(directory, exist_ok=True)
    removed = cleanup_dead_processes(directory, all_kinds=True)
    logger.info("metrics directory %s ready (%d stale files removed)", directory, removed)


def _check_gpus(args: AppArgs) -> None:
    """Say loudly, at deploy time, when the model asks for GPUs the cluster does not have."""
    import ray

    if args.device != "cuda" or is_tiny_random(args.model) or not ray.is_initialized():
        return
    num_gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus == 0:
        logger.error(
            "cogvlm_ray: device is 'cuda' but this Ray cluster has no GPUs. ModelServer replicas will stay "
            "PENDING (and /health answers 503 with Serve's scheduling message) until GPU nodes join, e.g. via "
            "the KubeRay autoscaler. Without GPUs, run the CPU demo: serve run serve_config.local.yaml"
        )
