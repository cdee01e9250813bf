"""Run the Triton kernels in the unit tests: compiled on a CUDA machine, interpreted on CPU.

Triton decides at decoration time whether a `@triton.jit` function is compiled or interpreted
(`TRITON_INTERPRET`, read when a module defining one is imported), and that includes Triton's
own `tl.max` / `tl.sum` library, imported with `triton` itself (which `torch._dynamo`, pulled in
by transformers, imports early). So on a machine without CUDA `preload()`, called first thing
by tests/conftest.py, imports Triton's language libraries with the variable set and then
restores the environment: no test, subprocess or Ray worker sees `TRITON_INTERPRET`. Nothing
compiled can run there anyway. `kernel_device()` then sets the variable only while a kernel
test imports the kernel modules (and for its own duration, so `can_run_on` agrees).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

KERNEL_MODULES = (
    "cogvlm_ray.model.kernels.paged_decode",
    "cogvlm_ray.model.kernels.paged_prefill",
    "cogvlm_ray.model.kernels.kv_write",
)


@contextmanager
def _interpret_env() -> Iterator[None]:
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def preload() -> None:
    """Without CUDA: import Triton's language libraries in interpreter mode (before anyone else)."""
    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    with _interpret_env():
        import triton.language  # noqa: F401

        with contextlib.suppress(ImportError):  # gluon asserts it was imported in tl's mode
            import triton.experimental.gluon.language  # noqa: F401


def _library_is_interpreted() -> bool:
    import triton.language.standard as standard

    return type(standard.max).__name__ == "InterpretedFunction"


@contextmanager
def kernel_device() -> Iterator[torch.device]:
    """The device kernel tests run on: CUDA (compiled kernels) or CPU (interpreted kernels)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    if not _library_is_interpreted():
        pytest.skip("triton was imported before tests/conftest.py could select its interpreter")
    from cogvlm_ray.model.kernels import is_interpreted

    with _interpret_env():
        for name in KERNEL_MODULES:
            module = sys.modules.get(name) or importlib.import_module(name)
            if not is_interpreted(module):
                module = importlib.reload(module)
            assert is_interpreted(module), name
        yield torch.device("cpu")
