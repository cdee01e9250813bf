"""BatchOptions: everything one batch job needs, as one frozen dataclass built by the CLI.

The model side is the server's own `AppArgs` (model, dtype, device, engine and preprocessing
knobs), so a batch job and a Serve replica built from the same values load the same model and
engine (`serve/factories.py` builds both). The rest says where the rows come from and go, how
they are sampled, and how the Ray Data pipeline is sized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cogvlm_ray.api.chat import ChatDefaults
from cogvlm_ray.serve.args import AppArgs

InputFormat = Literal["auto", "images", "openai", "table"]
OutputFormat = Literal["auto", "jsonl", "parquet"]

#: The extensions a folder or glob of images is filtered by (lower case, no dot).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class InputSpec:
    """Where the rows come from and how a row becomes a chat request."""

    path: str
    """A folder, a glob of images, an OpenAI Batch API `.jsonl`, or a `.parquet` / `.csv` table."""
    format: InputFormat = "auto"
    prompt: str = "Describe this image."
    """The user prompt for image folders and tables without a prompt column. A template:
    `{path}`, `{name}`, `{stem}` and (tables) any column name are replaced per row."""
    image_column: str = "image"
    """Table column holding the image: encoded bytes, or a path / URI string."""
    prompt_column: str | None = None
    """Table column holding each row's prompt (wins over `prompt`)."""
    id_column: str | None = None
    """Table column holding each row's id; default: the image path, else a content hash."""
    limit: int | None = None
    """Only the first `limit` rows (trying a job out)."""


@dataclass(frozen=True)
class PipelineSizing:
    """How Ray Data sizes the two stages."""

    min_actors: int = 1
    max_actors: int = 1
    """Engine actors: Ray Data autoscales the pool between the two."""
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    batch_size: int = 32
    """Rows per engine call; every row of a call is submitted to the engine at once."""
    max_concurrent_calls_per_actor: int = 2
    """Engine calls overlapping in one actor, so the next call's rows are queued before the
    previous call's last rows finish (continuous batching never drains between calls)."""
    preprocess_batch_size: int = 16
    num_cpus_per_preprocess_task: float = 1.0
    max_retries: int = 3
    """Actor restarts and per-call retries after an engine actor dies (bounded, not Ray Data's
    default of forever)."""


@dataclass(frozen=True)
class BatchOptions:
    input: InputSpec
    output: str
    """A `.jsonl` file, or a `.parquet` path (a folder of part files, one per run)."""
    output_format: OutputFormat = "auto"
    app: AppArgs = field(default_factory=AppArgs)
    """The server's model args: the same model, dtype, device, engine and preprocessing settings."""
    defaults: ChatDefaults = field(default_factory=ChatDefaults)
    """Sampling (max_tokens, temperature, top_p, top_k, repetition_penalty) where a row does not
    say: every row of folders and tables, and OpenAI Batch rows whose body leaves a field out."""
    request_fields: dict[str, Any] = field(default_factory=dict)
    """Extra chat request fields (`seed`, `stop`, `ignore_eos`, `min_tokens`, `template_version`)
    put in the request of every folder and table row; OpenAI Batch rows carry their own."""
    model_name: str | None = None
    """The `model` written in OpenAI Batch responses; default: `app.model_name`."""
    sizing: PipelineSizing = field(default_factory=PipelineSizing)
    resume: bool = True
    """Skip rows whose id is already in the output; False starts the output afresh."""
    include_token_ids: bool = False
    """Also write the generated token ids (JSONL: `token_ids`; Parquet always has them)."""
