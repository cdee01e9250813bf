"""Strict checkpoint loading: official CogVLM2 safetensors -> `CogVLM2ForCausalLM`.

The model is built on the meta device, then each tensor is read from disk on its own
(`safetensors_io`), cast to the target dtype and moved to the device its module was assigned
(`sharding.py`), and set in place. Nothing else is materialised, so peak host memory is about
the final weights plus one tensor. Every checkpoint key must match a model key with the same
shape; errors name the key and the file. No `trust_remote_code`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model.cogvlm import CogVLM2ForCausalLM
from cogvlm_ray.model.quantization import QuantizationSpec, WeightQuantizer, build_quantizer
from cogvlm_ray.model.safetensors_io import iter_tensors, read_header
from cogvlm_ray.model.sharding import DeviceMap, device_for, resolve_device_map

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


class CheckpointError(ValueError):
    """The checkpoint does not match the CogVLM2 architecture (message names key and file)."""


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded through huggingface_hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_hub_id), allow_patterns=HUB_PATTERNS))


def weight_files(directory: Path) -> dict[Path, list[str] | None]:
    """Weight files to read: `{file: expected keys (sharded index) or None (single file)}`."""
    index = directory / INDEX_FILE
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files: dict[Path, list[str] | None] = {}
        for key, name in weight_map.items():
            files.setdefault(directory / name, []).append(key)  # type: ignore[union-attr]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index} lists {file.name}, which is missing")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return {single: None}
    raise CheckpointError(
        f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} (only safetensors is supported)"
    )


def read_config(directory: Path, exact_rotary_positions: bool | None = None) -> ModelConfig:
    """The checkpoint's ModelConfig; problems with the file become CheckpointError."""
    try:
        config = ModelConfig.from_pretrained(directory)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    if exact_rotary_positions is not None:
        config = dataclasses.replace(config, exact_rotary_positions=exact_rotary_positions)
    return config


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """None / "auto" -> the config's torch_dtype (float32 if absent); strings like "bfloat16" accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype in (None, "auto") else dtype
    if name is None:
        return torch.float32
    resolved = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return resolved


def build_meta_model(
    config: ModelConfig,
    attention_backend: str = "sdpa",
    model_cls: type[CogVLM2ForCausalLM] = CogVLM2ForCausalLM,
) -> CogVLM2ForCausalLM:
    """The model with every parameter on the meta device (no memory)."""
    with torch.device("meta"):
        return model_cls(config, attention_backend=attention_backend)


def read_stop_token_ids(directory: Path, config: ModelConfig) -> tuple[int, ...]:
    """The checkpoint's stop ids: config.json's `eos_token_id` plus generation_config.json's."""
    ids = list(config.eos_token_ids)
    generation_file = directory / "generation_config.json"
    if generation_file.is_file():
        with open(generation_file, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return tuple(dict.fromkeys(int(i) for i in ids))


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    *,
    exact_rotary_positions: bool | None = None,
    attention_backend: str = "sdpa",
    quantization: str | QuantizationSpec | None = None,
    quantize_vision: bool = True,
    model_cls: type[CogVLM2ForCausalLM] = CogVLM2ForCausalLM,
) -> CogVLM2ForCausalLM:
    """Load an official CogVLM2 checkpoint (local dir or hub id) in eval mode.

    Builds the plain engine-facing model; the Hugging Face drop-in class
    (`cogvlm_ray.hf.CogVLM2HFForCausalLM.from_pretrained`) passes itself as `model_cls`.
    The checkpoint's stop ids are attached as `model.stop_token_ids` and its directory as
    `model.checkpoint_dir`.

    `device_map`: None (everything on CPU), a device ("cuda:0"), "auto" / "balanced" /
    "balanced_low_0" / "sequential" (accelerate, with optional `max_memory`), or an explicit
    `{module_name: device}` map. `exact_rotary_positions` overrides the config switch.
    `quantization`: "none" / "bnb-4bit" / "bnb-8bit" / "int8-wo" / "int8-dq" / "fp8" quantizes
    the Linear layers while loading (`quantization.py`; `quantize_vision=False` keeps the vision
    tower in float); a checkpoint whose config has a bnb 4-bit `quantization_config` loads as stored.
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    config = read_config(directory, exact_rotary_positions)
    target_dtype = resolve_dtype(dtype, config)
    model = build_meta_model(config, attention_backend, model_cls)
    resolved_map = resolve_device_map(model, device_map, max_memory, target_dtype)
    quantizer = build_quantizer(quantization, config.quantization_config, target_dtype, quantize_vision)
    if quantizer is not None:
        quantizer.prepare(model, resolved_map.values())
    load_weights(model, directory, target_dtype, resolved_map, quantizer)
    model.quantization_spec = quantizer.spec if quantizer is not None else None
    model.hf_device_map = dict(resolved_map)
    model.stop_token_ids = read_stop_token_ids(directory, config)
    model.checkpoint_dir = directory
    model.eval()
    logger.info(
        "loaded CogVLM2 from %s (%s, devices %s)",
        directory,
        target_dtype,
        sorted(set(map(str, resolved_map.values()))),
    )
    return model


#: Buffers a checkpoint may omit; they are then computed (the official checkpoints store them).
OPTIONAL_KEYS_SUFFIX = ".rotary_emb.inv_freq"


def load_weights(
    model: nn.Module,
    directory: Path,
    dtype: torch.dtype,
    device_map: DeviceMap,
    quantizer: WeightQuantizer | None = None,
) -> None:
    """Read every tensor of the checkpoint into `model` (built on meta), strictly.

    Tensors the `quantizer` claims (quantized Linear weights) are checked and consumed by it.
    """
    expected = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    for file, listed in weight_files(directory).items():
        entries = read_header(file)
        if listed is not None:
            in_file = {e.name for e in entries}
            absent = sorted(set(listed) - in_file)
            if absent:
                raise CheckpointError(f"{absent[0]!r} is listed in {INDEX_FILE} but missing from {file}")
        for entry in entries:
            if entry.name in loaded:
                raise CheckpointError(f"duplicate key {entry.name!r} in {file}")
            if quantizer is not None and quantizer.claims(entry.name, entry.dtype):
                problem = quantizer.check(entry.name, entry.shape)
                if problem:
                    raise CheckpointError(f"{problem} in {file}")
                continue
            if entry.name not in expected:
                raise CheckpointError(f"unexpected key {entry.name!r} in {file}")
            want = tuple(expected[entry.name].shape)
            if entry.shape != want:
                raise CheckpointError(
                    f"shape mismatch for {entry.name!r} in {file}: checkpoint {entry.shape}, model {want}"
                )
        for entry, tensor in iter_tensors(file, entries):
            device = device_for(entry.name, device_map)
            if quantizer is not None and quantizer.claims(entry.name, entry.dtype):
                quantizer.take(entry.name, tensor, device)
                loaded.add(entry.name)
                continue
            target = dtype if tensor.is_floating_point() else tensor.dtype
            set_tensor(model, entry.name, tensor.to(device=device, dtype=target))
            loaded.add(entry.name)
    problem = quantizer.finish() if quantizer is not None else None
    if problem:
        raise CheckpointError(f"{problem} in checkpoint {directory}")
    missing = sorted(k for k in set(expected) - loaded if not k.endswith(OPTIONAL_KEYS_SUFFIX))
    if missing:
        raise CheckpointError(
            f"missing key {missing[0]!r} ({len(missing)} missing) in checkpoint {directory}"
        )
    for key in sorted(set(expected) - loaded):
        module_name = key.rsplit(".", 1)[0]
        rotary = model.get_submodule(module_name)
        logger.debug("%s not in checkpoint; computed", key)
        set_tensor(model, key, rotary.textbook_inv_freq().to(device=device_for(key, device_map), dtype=dtype))


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `key` with `value` (no copy, no autograd)."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value
