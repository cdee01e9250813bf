"""`AppArgs`: the `args:` of `serve_config*.yaml`, validated once when the app is built.

The engine and preprocessing sections are the library's own dataclasses (`EngineConfig`,
`PreprocessOptions`), validated by pydantic straight into them, so a field added there is a
Serve arg at once, with its default and its checks (`EngineConfig.validate`,
`PreprocessOptions.__post_init__`) defined in one place. Unknown keys fail, naming them.
Request-level defaults come from `ChatDefaults` (itself from `SamplingParams`).
Every field is documented in docs/serving.md (a test checks it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cogvlm_ray.api.chat import ChatDefaults
from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.engine.config import EngineConfig
from cogvlm_ray.errors import InvalidRequestError
from cogvlm_ray.preprocess.options import PreprocessOptions

#: The environment variable every replica's Prometheus client reads; when set, it wins.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_CHAT_DEFAULTS = ChatDefaults()

logger = logging.getLogger(__name__)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    engine: EngineConfig = EngineConfig()
    """`cogvlm_ray.engine.EngineConfig`, field for field (docs/engine.md)."""
    preprocess: PreprocessOptions = PreprocessOptions()
    """`cogvlm_ray.preprocess.PreprocessOptions`, field for field (docs/preprocessing.md)."""
    default_max_tokens: int = Field(_CHAT_DEFAULTS.max_tokens, ge=1)
    default_temperature: float | None = None
    """`temperature` when a request has none. None: the checkpoint's generation_config.json
    value if it has one, else 1.0 (`SamplingParams`)."""
    default_top_p: float | None = None
    """As `default_temperature`, for `top_p` (fallback 1.0)."""
    default_top_k: int | None = Field(None, ge=0)
    """As `default_temperature`, for `top_k` (fallback 0: off)."""
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

    @field_validator("engine")
    @classmethod
    def _engine_runs(cls, engine: EngineConfig) -> EngineConfig:
        engine.validate()  # the engine's own checks, so a bad value fails at deploy time
        return engine

    @model_validator(mode="after")
    def _defaults_are_valid_sampling(self) -> AppArgs:
        # The same checks the engine applies to every request, once, to the server defaults.
        defaults = self._sampling_defaults(self.chat_defaults)
        try:
            defaults.validate()
        except InvalidRequestError as e:
            raise ValueError(f"default_{e.param}: {e.message}") from None
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]

    @property
    def chat_defaults(self) -> ChatDefaults:
        """The request defaults from these args alone (no checkpoint values)."""
        return self._chat_defaults({})

    def chat_defaults_for(self, model_dir: Path) -> ChatDefaults:
        """The request defaults: these args where set, else the checkpoint's generation_config.json
        (temperature, top_p, top_k, repetition_penalty, as vLLM reads it), else `SamplingParams`'s.
        A checkpoint value the engine would refuse is skipped with a warning."""
        checkpoint = read_generation_defaults(model_dir)
        defaults = self._chat_defaults(checkpoint)
        try:
            self._sampling_defaults(defaults).validate()
        except InvalidRequestError as e:
            logger.warning("ignoring %s/generation_config.json sampling values: %s", model_dir, e.message)
            defaults = self.chat_defaults
        if checkpoint:
            logger.info("sampling defaults from %s/generation_config.json: %s", model_dir, checkpoint)
        return defaults

    def _chat_defaults(self, checkpoint: dict[str, Any]) -> ChatDefaults:
        def pick(arg: Any, key: str) -> Any:
            return arg if arg is not None else checkpoint.get(key, getattr(_CHAT_DEFAULTS, key))

        return ChatDefaults(
            max_tokens=self.default_max_tokens,
            temperature=float(pick(self.default_temperature, "temperature")),
            top_p=float(pick(self.default_top_p, "top_p")),
            top_k=int(pick(self.default_top_k, "top_k")),
            repetition_penalty=float(pick(None, "repetition_penalty")),
        )

    @staticmethod
    def _sampling_defaults(defaults: ChatDefaults) -> SamplingParams:
        return SamplingParams(
            max_tokens=defaults.max_tokens,
            temperature=defaults.temperature,
            top_p=defaults.top_p,
            top_k=defaults.top_k,
            repetition_penalty=defaults.repetition_penalty,
        )

    @property
    def metrics_directory(self) -> str:
        """The multiprocess metrics directory: $PROMETHEUS_MULTIPROC_DIR if set, else `metrics_dir`."""
        return os.environ.get(METRICS_DIR_ENV) or os.path.expanduser(self.metrics_dir)

    def model_dir(self, *, weights: bool = True) -> Path:
        """The checkpoint directory on this node (downloads or creates it on first use)."""
        from cogvlm_ray.serve.model_source import resolve_model_path

        return resolve_model_path(self.model, os.path.expanduser(self.cache_dir), weights=weights)


_GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def read_generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The sampling values of `<model_dir>/generation_config.json` ({} when absent or unreadable)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("could not read %s: %s", path, e)
        return {}
    return {
        key: raw[key]
        for key in _GENERATION_KEYS
        if isinstance(raw, dict)
        and isinstance(raw.get(key), int | float)
        and not isinstance(raw.get(key), bool)
    }


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
