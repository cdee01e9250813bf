"""Device maps for one replica spread over several devices (accelerate).

`resolve_device_map` turns the user's `device_map` / `max_memory` into `{module_name: device}`
on a meta-device model, with decoder layers, vision layers, the patch embedding and the GLU
adapter as no-split units. The loader places each tensor by longest-prefix lookup
(`device_for`); the model moves activations between devices itself, so no accelerate hooks
are installed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DeviceMap = dict[str, str | int | torch.device]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def normalize_device(device: str | int | torch.device) -> torch.device:
    """accelerate's ints mean CUDA ordinals; "disk" offload is not supported."""
    if isinstance(device, int):
        return torch.device("cuda", device)
    if device == "disk":
        raise ValueError("disk offload is not supported; give the model more max_memory")
    return torch.device(device)


def resolve_device_map(
    model: nn.Module,
    device_map: str | dict[str, Any] | torch.device | None,
    max_memory: dict[int | str, int | str] | None,
    dtype: torch.dtype,
) -> DeviceMap:
    """`{module_name: device}` for every parameter of `model` (a meta-device model is fine)."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, (torch.device, int)):
        return {"": str(normalize_device(device_map))}
    if isinstance(device_map, str) and device_map not in STRATEGIES:
        return {"": str(normalize_device(device_map))}
    if isinstance(device_map, dict):
        resolved = {k: v for k, v in device_map.items()}
        for key in model.state_dict():
            device_for(key, resolved)  # raises if uncovered
        for value in resolved.values():
            normalize_device(value)
        return resolved
    return infer_device_map(model, strategy=device_map, max_memory=max_memory, dtype=dtype)


def infer_device_map(
    model: nn.Module, strategy: str, max_memory: dict[int | str, int | str] | None, dtype: torch.dtype
) -> DeviceMap:
    """accelerate's placement: fill devices in order ("sequential") or balance them (the others)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", []))
    max_memory = dict(max_memory) if max_memory else None  # accelerate rewrites the dict in place
    if strategy != "sequential":
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=strategy == "balanced_low_0",
        )
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )
    if any(v == "disk" for v in device_map.values()):
        raise ValueError(f"the model does not fit in max_memory={max_memory} without disk offload")
    return device_map


def device_for(key: str, device_map: DeviceMap) -> torch.device:
    """Device of parameter `key`: the entry with the longest matching module prefix."""
    name = key
    while True:
        if name in device_map:
            return normalize_device(device_map[name])
        if not name:
            raise ValueError(f"device_map does not place {key!r}")
        name = name.rpartition(".")[0]
