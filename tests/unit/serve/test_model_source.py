"""Where replicas get their checkpoint: tiny-random creation (idempotent, race-safe) and hub ids."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.serve import model_source
from cogvlm_ray.serve.model_source import CONFIG_AND_TOKENIZER_PATTERNS, resolve_model_path


def test_tiny_random_is_created_once_and_shared_by_concurrent_replicas(tmp_path: Path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(lambda _: resolve_model_path("tiny-random", tmp_path), range(2)))
    assert paths[0] == paths[1] == tmp_path / "tiny-random-tiny-seed0"
    ModelConfig.from_pretrained(paths[0])  # a complete checkpoint, not a half-written one
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random-tiny-seed0"]  # no scratch dirs left
    mtime = os.stat(paths[0] / "config.json").st_mtime_ns
    assert resolve_model_path("tiny-random", tmp_path) == paths[0]
    assert os.stat(paths[0] / "config.json").st_mtime_ns == mtime


def test_preprocessors_download_config_and_tokenizer_only(monkeypatch, tmp_path: Path):
    calls = []

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("THUDM/cogvlm2-llama3-chat-19B", tmp_path, weights=False) == tmp_path
    assert calls == [("THUDM/cogvlm2-llama3-chat-19B", CONFIG_AND_TOKENIZER_PATTERNS)]
    assert not any("safetensors" in p for p in CONFIG_AND_TOKENIZER_PATTERNS)
    local = tmp_path / "ckpt"
    local.mkdir()
    assert resolve_model_path(str(local), tmp_path, weights=False) == local


def test_tiny_preset_parsing():
    assert (
        model_source.is_tiny_random("tiny-random:bench")
        and model_source.tiny_preset("tiny-random:bench") == "bench"
    )
    assert not model_source.is_tiny_random("THUDM/cogvlm2-llama3-chat-19B")
