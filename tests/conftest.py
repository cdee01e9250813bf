"""Session-wide test settings shared by every suite. Area-specific fixtures live next to their tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "cogvlm2-tiny"

# 2-core CI machine: keep torch from oversubscribing while Ray workers also run.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The official tiny CogVLM2 checkpoint + tokenizer + golden outputs (copied from shared/)."""
    return FIXTURE_DIR
