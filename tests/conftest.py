"""Session-wide test settings shared by every suite. Area-specific fixtures live next to their tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import preload as _preload_triton

# Before anything imports triton: on CPU its kernels can only run interpreted (see the module).
_preload_triton()

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "cogvlm2-tiny"

# 2-core CI machine: keep torch from oversubscribing while Ray workers also run.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The official tiny CogVLM2 checkpoint + tokenizer + golden outputs (copied from shared/)."""
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory: pytest.TempPathFactory):
    """The real app on the tiny random model in one local Ray cluster for the whole session
    (integration, reliability, router and browser suites share it; see tests/serve_app.py)."""
    from tests.serve_app import start_serve_app

    with start_serve_app(tmp_path_factory.mktemp("serve")) as app:
        yield app
