"""The Ray Serve application: three deployments and `build_app(args)`.

    HTTP -> Ingress (FastAPI, CPU) --prepare--> Preprocessor (CPU)
                 \\                                   | PreparedPrompt (uint8 image, object store)
                  `--generate(stream)------------> ModelServer (GPU: engine, continuous batching)

This is the one module with `serve.deployment(...)`, `.bind(...)` and the app builder named in
`serve_config*.yaml` (`import_path: cogvlm_ray.serve.app:build_app`). `args:` in those files
must validate against `AppArgs` (`serve/args.py`; unknown keys are rejected). Environment
variables are read only here and in `serve/args.py` (the metrics directory). Deployment options set here (`max_ongoing_requests` = engine
batch size, queue bounds, CPUs) are defaults; the config file's `deployments:` section
overrides them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cogvlm_ray.serve.args import METRICS_DIR_ENV, AppArgs, parse_args
from cogvlm_ray.serve.backend import RayChatBackend
from cogvlm_ray.serve.factories import load_engine, make_preprocessor
from cogvlm_ray.serve.ingress import IngressSettings, create_app
from cogvlm_ray.serve.logs import use_serve_handlers
from cogvlm_ray.serve.metrics import cleanup_dead_processes, get_metrics
from cogvlm_ray.serve.model_source import is_tiny_random
from cogvlm_ray.serve.router import ROUTER_CLASS_PATH
from cogvlm_ray.serve.server import ModelServer, PreprocessServer

logger = logging.getLogger(__name__)

PREPROCESSOR = "Preprocessor"
MODEL_SERVER = "ModelServer"
INGRESS = "Ingress"

__all__ = ["INGRESS", "MODEL_SERVER", "PREPROCESSOR", "AppArgs", "build_app", "parse_args"]


def _metrics(args: AppArgs) -> Any:
    """This process's metrics, in multiprocess mode under the shared directory."""
    directory = args.metrics_directory
    os.environ.setdefault(METRICS_DIR_ENV, directory)
    return get_metrics(multiprocess_dir=directory, use_ray=args.ray_metrics)


@serve.deployment(name=PREPROCESSOR, max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class PreprocessorDeployment:
    """CPU: Conversation -> PreparedPrompt (tokenizer and config loaded once per replica)."""

    def __init__(self, raw_args: dict[str, Any]):
        use_serve_handlers()
        args = AppArgs.model_validate(raw_args)
        self.server = PreprocessServer(
            make_preprocessor(args, args.model_dir(weights=False)), metrics=_metrics(args)
        )

    async def prepare(self, conversation: Any, max_tokens: int, template_version: str | None) -> Any:
        return await self.server.prepare(conversation, max_tokens, template_version)

    async def tokenize(self, job: Any) -> Any:
        return await self.server.tokenize(job)

    async def detokenize(self, token_ids: list[int]) -> Any:
        return await self.server.detokenize(token_ids)


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
        use_serve_handlers()
        args = AppArgs.model_validate(raw_args)
        model_dir = args.model_dir()
        self.server = ModelServer(
            lambda: load_engine(args, model_dir),
            metrics=_metrics(args),
            shutdown_timeout_s=args.shutdown_timeout_s,
            stream_interval_s=args.stream_interval_s,
            model_name=args.model_name,
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
        use_serve_handlers()
        args = AppArgs.model_validate(raw_args)
        api_key = args.api_key or (os.environ.get(args.api_key_env) if args.api_key_env else None) or None
        self.settings = IngressSettings(
            served_model_names=(args.model_name,),
            model_root=args.model,
            max_model_len=args.engine.max_model_len,
            api_key=api_key,
            max_request_bytes=args.max_request_bytes,
            request_timeout_s=args.request_timeout_s,
            defaults=_chat_defaults(args),
            max_n=args.engine.max_n,
            echo_request_id=False,  # Ray Serve's proxy adds the x-request-id response header
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


def _chat_defaults(args: AppArgs) -> Any:
    """Request defaults, with the checkpoint's generation_config.json (args' own if unreadable).
    Tiny-random checkpoints have no sampling values, so the ingress does not build one."""
    if is_tiny_random(args.model):
        return args.chat_defaults
    try:
        return args.chat_defaults_for(args.model_dir(weights=False))
    except Exception:
        logger.warning(
            "could not read the checkpoint's generation config; using the args' defaults", exc_info=True
        )
        return args.chat_defaults


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The Serve application (the config's `import_path` target)."""
    app_args = parse_args(args)
    _prepare_metrics_dir(app_args)
    _check_gpus(app_args)
    raw = app_args.model_dump(mode="json")
    env = {"env_vars": {METRICS_DIR_ENV: app_args.metrics_directory}}
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
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASS_PATH,
        request_router_kwargs={
            "max_load_imbalance": args.routing.max_load_imbalance,
            "max_affinity_candidates": args.routing.max_affinity_candidates,
            "metrics_dir": args.metrics_directory,
            "ray_metrics": args.ray_metrics,
        },
    )


def _prepare_metrics_dir(args: AppArgs) -> None:
    """Create the multiprocess metrics directory on this node and drop files of dead processes."""
    directory = args.metrics_directory
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
