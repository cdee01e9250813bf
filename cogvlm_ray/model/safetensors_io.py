"""Streaming reader for `.safetensors` files: one tensor at a time, straight into its buffer.

We parse the header ourselves and `readinto` each tensor's bytes, instead of memory-mapping
the whole file (mapped pages count towards RSS while the file stays open), so loading a
checkpoint holds at most the model plus one tensor in transit.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset in the file."""
    num_bytes: int


def read_header(path: Path) -> list[TensorEntry]:
    """Tensor entries of a safetensors file, in file order."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw_len)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
    base = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries.append(
            TensorEntry(name, DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, end - begin)
        )
    entries.sort(key=lambda e: e.start)
    return entries


def iter_tensors(path: Path, entries: list[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Yield `(entry, cpu_tensor)` for the given entries, each read into a fresh buffer."""
    with open(path, "rb", buffering=0) as f:
        for entry in entries:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            if entry.num_bytes != tensor.numel() * tensor.element_size():
                raise ValueError(
                    f"{path}: tensor {entry.name!r} has {entry.num_bytes} bytes for shape {entry.shape}"
                )
            if entry.num_bytes:
                f.seek(entry.start)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                got = 0
                while got < entry.num_bytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise ValueError(f"{path}: truncated while reading {entry.name!r}")
                    got += n
            yield entry, tensor
