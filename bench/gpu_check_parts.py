"""Pieces of `bench/gpu_check.py` that need no GPU: the bandwidth table, the incremental JSON
file, early stop on SIGTERM, prompts, the SDPA-kernel probe and the sync-warning counter.

Imports only torch, numpy and the engine-side package modules (no Ray, FastAPI, pydantic or
Pillow): the GPU machine has CUDA torch, transformers and triton, nothing else of ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.contracts import PreparedPrompt

logger = logging.getLogger("bench.gpu_check")

#: Peak HBM bandwidth (bytes/s, datasheet) by a substring of `torch.cuda.get_device_name()`,
#: first match wins (so "H100 PCIe" / "H100 NVL" before the SXM "H100 80GB HBM3").
PEAK_BANDWIDTH: list[tuple[str, float]] = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
]


def peak_bandwidth_for(device_name: str) -> float | None:
    """Datasheet HBM bandwidth for a device name, or None when the table does not know it."""
    for key, bandwidth in PEAK_BANDWIDTH:
        if key.lower() in device_name.lower():
            return bandwidth
    return None


class EarlyStop(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT so the partial results are still written."""


class ResultsFile:
    """The JSON document, rewritten atomically after every `set` (survives a kill mid-run)."""

    def __init__(self, path: str | Path | None, document: dict[str, Any] | None = None) -> None:
        self.path = Path(path) if path else None
        self.document: dict[str, Any] = {"complete": False, **(document or {})}
        self.flush()

    def set(self, key: str, value: Any) -> None:
        self.document[key] = value
        self.flush()

    def update(self, key: str, sub_key: str, value: Any) -> None:
        self.document.setdefault(key, {})[sub_key] = value
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.document, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def text(self) -> str:
        return json.dumps(self.document, indent=2, default=str)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (e.g. `timeout`) and SIGINT raise `EarlyStop` in the main thread while inside."""

    def handler(signum: int, frame: Any) -> None:
        raise EarlyStop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class Deadline:
    """The run's time budget: sections that would start after it are skipped and listed."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


# ---- prompts --------------------------------------------------------------------------------
def text_prompt(config: ModelConfig, num_tokens: int, rng: np.random.Generator) -> PreparedPrompt:
    text_ids = rng.integers(0, config.vocab_size - 256, size=num_tokens).tolist()  # no special ids
    ids = [config.bos_token_id, *text_ids]
    return PreparedPrompt(input_ids=ids, token_type_ids=[0] * len(ids), image=None, image_hash=None)


def random_image(config: ModelConfig, rng: np.random.Generator) -> np.ndarray:
    size = config.vision_config.image_size
    return rng.integers(0, 256, size=(3, size, size), dtype=np.uint8)


def image_prompt(
    config: ModelConfig, num_text_tokens: int, rng: np.random.Generator, image: np.ndarray | None = None
) -> PreparedPrompt:
    """bos, the image span (2306 positions at 1344 px), then random text; a new image unless given."""
    image = random_image(config, rng) if image is None else image
    text_ids = rng.integers(0, config.vocab_size - 256, size=num_text_tokens).tolist()
    num_image = config.num_image_tokens
    ids = [config.bos_token_id] + [config.image_token_id] * num_image + text_ids
    types = [0] + [1] * num_image + [0] * num_text_tokens
    image_hash = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
    return PreparedPrompt(input_ids=ids, token_type_ids=types, image=image, image_hash=image_hash)


# ---- what the GPU runs ----------------------------------------------------------------------
def sdpa_backend_chosen(
    device: torch.device, dtype: torch.dtype, config: ModelConfig, batch: int, context: int
) -> dict[str, str]:
    """The kernel PyTorch's SDPA dispatcher picks for our decode call (GQA, key mask) and for a
    causal prefill, at these shapes, with and without K/V repeated to the query heads."""
    from torch.nn.attention import SDPBackend

    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.zeros(batch, heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.zeros(batch, kv_heads, context, head_dim, device=device, dtype=dtype)
    mask = torch.ones(batch, 1, 1, context, device=device, dtype=torch.bool)
    k_rep = k.repeat_interleave(heads // kv_heads, dim=1)
    qp = torch.zeros(1, heads, min(context, 512), head_dim, device=device, dtype=dtype)
    kp = torch.zeros(1, kv_heads, min(context, 512), head_dim, device=device, dtype=dtype)
    calls = {
        "decode_gqa_masked": (q, k, k, mask, False, True),
        "decode_repeated_kv_masked": (q, k_rep, k_rep, mask, False, False),
        "prefill_gqa_causal": (qp, kp, kp, None, True, True),
    }
    out = {}
    for name, (qq, kk, vv, m, causal, gqa) in calls.items():
        try:
            choice = torch._fused_sdp_choice(qq, kk, vv, m, 0.0, causal, scale=None, enable_gqa=gqa)
            out[name] = SDPBackend(choice).name
        except Exception as exc:  # a private API: report, never fail the run on it
            out[name] = f"unknown ({exc!r})"
    return out


class SyncWarningCounter:
    """Counts the warnings of `torch.cuda.set_sync_debug_mode("warn")` (from any thread) and
    where in our code each sync came from (innermost `cogvlm_ray` frame)."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: Counter[str] = Counter()

    @contextmanager
    def watching(self, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            yield
            return
        previous_show = warnings.showwarning

        def show(message: Any, category: type, filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
            if "synchroniz" not in str(message):
                return previous_show(message, category, filename, lineno, *args, **kwargs)
            self.count += 1
            ours = [f for f in traceback.extract_stack() if "cogvlm_ray" in f.filename]
            site = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else filename
            self.sites[site] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = previous_show

    def report(self, num_steps: int) -> dict[str, Any]:
        return {
            "num_sync_warnings": self.count,
            "num_steps": num_steps,
            "sync_warnings_per_step": self.count / max(num_steps, 1),
            "top_sites": dict(self.sites.most_common(8)),
        }


def memory_report(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
            "device_used_gib": (total - free) / 2**30,
            "device_total_gib": total / 2**30,
        }
    status = Path("/proc/self/status").read_text().splitlines()
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_gib": kib.get("VmRSS", 0) / 2**20, "peak_rss_gib": kib.get("VmHWM", 0) / 2**20}


def device_description(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "memory_gib": props.total_memory / 2**30, "torch": torch.__version__,
                "cuda": torch.version.cuda}  # fmt: skip
    return {"name": f"CPU ({torch.get_num_threads()} threads)", "torch": torch.__version__}
