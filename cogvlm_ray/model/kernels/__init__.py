"""Triton kernels of the paged attention: decode, varlen (chunked) prefill and the KV-cache write.

One kernel per module, its launch wrapper beside the `@triton.jit` body and the reference it
must equal named in its docstring (`paged_decode.py`, `paged_prefill.py`, `kv_write.py`). They
read and write the cache layout of `attention.py` in place (`[num_blocks, block_size,
num_kv_heads, head_dim]`, addressed through the block table): no gather of a sequence's context.

Importing this package does not import Triton; the kernel modules do. On a GPU they compile;
on a CPU they only run under Triton's interpreter (`TRITON_INTERPRET=1` set before the kernel
modules are imported), which is how the unit tests check them against the references.
"""

from __future__ import annotations

import importlib.util
import os
import types

import torch


def triton_importable() -> bool:
    """Whether `import triton` can work here (CUDA builds of torch ship it)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def interpreter_enabled() -> bool:
    """Triton's own switch: kernels decorated while it is "1" run in numpy on the host."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_on(device: torch.device) -> tuple[bool, str]:
    """(ok, why not): whether the Triton kernels can run on tensors of `device`."""
    if not triton_importable():
        return False, "triton is not installed (it ships with CUDA builds of torch)"
    if device.type == "cuda" or interpreter_enabled():
        return True, ""
    return False, (
        f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 (the slow interpreter, for tests) "
        f"on {device.type}"
    )


def next_power_of_2(n: int) -> int:
    """Triton block sizes are powers of two (`tl.arange`)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def is_interpreted(kernel_or_module: object) -> bool:
    """Whether a `@triton.jit` kernel (or every kernel of a module) runs in the interpreter."""
    objects = (
        [v for k, v in vars(kernel_or_module).items() if k.endswith("_kernel")]
        if isinstance(kernel_or_module, types.ModuleType)
        else [kernel_or_module]
    )
    return bool(objects) and all(type(o).__name__ == "InterpretedFunction" for o in objects)


def dot_operands(cache_dtype: torch.dtype, interpreted: bool) -> tuple[object, str]:
    """(operand dtype, `input_precision`) of the kernels' `tl.dot`s for a cache of `cache_dtype`.

    Float32 caches: float32 operands with "ieee" (exact products; TF32 would round them).
    Half caches on a GPU: the cache dtype (tensor cores; P is rounded to it before `P @ V`).
    Under the interpreter half operands are upcast to float32, because Triton 3.9's interpreted
    `tl.dot` on bfloat16 returns garbage; the indexing and softmax it tests are the same.
    """
    import triton.language as tl

    if cache_dtype == torch.float32 or interpreted:
        return tl.float32, "ieee"
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[cache_dtype], "tf32"
