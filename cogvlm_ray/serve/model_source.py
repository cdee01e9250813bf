"""Where a replica's checkpoint comes from: a local directory, a Hugging Face hub id, or the
built-in tiny random model.

`TINY_RANDOM` ("tiny-random", or "tiny-random:<preset>") names a checkpoint with RANDOM weights
(`cogvlm_ray.model.tiny`), created on first use in a cache directory. It exists to try the whole
serving pipeline on a laptop; its answers are gibberish by construction. Creation is idempotent
and safe when several replicas start at once: each writes to its own temporary directory and
renames it into place; the loser of the race discards its copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"


def is_tiny_random(model: str) -> bool:
    return model == TINY_RANDOM or model.startswith(TINY_RANDOM + ":")


def tiny_preset(model: str) -> str:
    return model.split(":", 1)[1] if ":" in model else "tiny"


#: What a preprocessing replica needs from a hub checkpoint: config and tokenizer, not 39 GB of weights.
CONFIG_AND_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt"]


def resolve_model_path(model: str, cache_dir: str | os.PathLike, *, weights: bool = True) -> Path:
    """A local checkpoint directory for `model` (downloading or creating it when needed).

    `weights=False` (preprocessing replicas) downloads only the config and tokenizer files of a
    hub checkpoint; a local directory or tiny-random checkpoint is returned as it is.
    """
    if is_tiny_random(model):
        return ensure_tiny_checkpoint(Path(cache_dir), tiny_preset(model))
    if not weights and not Path(model).expanduser().exists():
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=CONFIG_AND_TOKENIZER_PATTERNS))
    from cogvlm_ray.model.loading import resolve_checkpoint_dir

    return resolve_checkpoint_dir(model)


def ensure_tiny_checkpoint(cache_dir: Path, preset: str = "tiny", seed: int = 0) -> Path:
    target = cache_dir / f"{TINY_RANDOM}-{preset}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    from cogvlm_ray.model.tiny import make_tiny_checkpoint

    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = cache_dir / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        make_tiny_checkpoint(scratch, preset=preset, seed=seed)
        try:
            os.rename(scratch, target)
            logger.warning(
                "created a tiny RANDOM-weight checkpoint at %s (for trying the pipeline only)", target
            )
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
