"""Strict streaming loader: layouts, dtypes, and errors that name the key and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model import CheckpointError, CogVLM2ForCausalLM, load_model
from cogvlm_ray.model.tiny import make_tiny_checkpoint

from .conftest import FIXTURE_DIR, PagedRunner, load_case, prompt_inputs


def _copy_fixture(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(FIXTURE_DIR / "config.json", out / "config.json")
    save_file(
        tensors if tensors is not None else load_file(str(FIXTURE_DIR / "model.safetensors")),
        str(out / "model.safetensors"),
    )
    return out


def _write_sharded(tmp_path: Path) -> Path:
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(FIXTURE_DIR / "config.json", out / "config.json")
    tensors = load_file(str(FIXTURE_DIR / "model.safetensors"))
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file))
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_loaded_model_equals_checkpoint_and_is_eval(tiny_model: CogVLM2ForCausalLM) -> None:
    tensors = load_file(str(FIXTURE_DIR / "model.safetensors"))
    state = tiny_model.state_dict()
    assert set(state) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(state[name], value), name
    assert not tiny_model.training
    assert all(p.device.type == "cpu" and not p.requires_grad for p in tiny_model.parameters())


def test_sharded_layout_loads_the_same(tmp_path: Path, tiny_model: CogVLM2ForCausalLM) -> None:
    model = load_model(_write_sharded(tmp_path))
    for (name, a), (_, b) in zip(
        sorted(model.state_dict().items()), sorted(tiny_model.state_dict().items()), strict=True
    ):
        assert torch.equal(a, b), name


def test_bf16_goes_straight_to_target_dtype() -> None:
    model = load_model(FIXTURE_DIR, dtype="bfloat16")
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert model.kv_cache_layout() == [(torch.device("cpu"), torch.bfloat16)] * 2


def test_missing_key_names_key(tmp_path: Path) -> None:
    tensors = load_file(str(FIXTURE_DIR / "model.safetensors"))
    del tensors["model.layers.1.mlp.vision_mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.vision_mlp\.up_proj\.weight"):
        load_model(_copy_fixture(tmp_path, tensors))


def test_unexpected_key_names_key_and_file(tmp_path: Path) -> None:
    tensors = load_file(str(FIXTURE_DIR / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.extra\.weight' in .*model\.safetensors"):
        load_model(_copy_fixture(tmp_path, tensors))


def test_shape_mismatch_names_key_and_file(tmp_path: Path) -> None:
    tensors = load_file(str(FIXTURE_DIR / "model.safetensors"))
    tensors["lm_head.weight"] = torch.zeros(768, 32)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' in .*model\.safetensors.*\(768, 32\)"):
        load_model(_copy_fixture(tmp_path, tensors))


def test_directory_without_weights_or_with_foreign_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(FIXTURE_DIR / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(empty)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    with pytest.raises(CheckpointError, match="not a CogVLM2 checkpoint"):
        load_model(llama)


def test_missing_inv_freq_is_computed(tmp_path: Path, tiny_model: CogVLM2ForCausalLM) -> None:
    tensors = {
        k: v for k, v in load_file(str(FIXTURE_DIR / "model.safetensors")).items() if "inv_freq" not in k
    }
    model = load_model(_copy_fixture(tmp_path, tensors))
    for ours, ref in zip(model.model.layers, tiny_model.model.layers, strict=True):
        torch.testing.assert_close(ours.self_attn.rotary_emb.inv_freq, ref.self_attn.rotary_emb.inv_freq)


def test_factory_checkpoint_sharded_loads_and_runs(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "factory", preset="tiny", seed=3, shard_size_bytes=200_000)
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path)
    case = load_case("text_only_chat")
    hidden = PagedRunner(model).step(
        [("s", prompt_inputs(model, {**case, "input_ids": case["input_ids"] % 512}))]
    )[0]
    assert torch.isfinite(hidden).all()


def test_stop_ids_join_config_and_generation_config(tmp_path: Path) -> None:
    from cogvlm_ray.model.loading import read_stop_token_ids

    config = ModelConfig(eos_token_id=(513, 521))
    assert read_stop_token_ids(tmp_path, config) == (513, 521)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [521, 600]}')
    assert read_stop_token_ids(tmp_path, config) == (513, 521, 600)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 700}')
    assert read_stop_token_ids(tmp_path, config) == (513, 521, 700)


def test_load_model_attaches_the_checkpoint_stop_ids(tmp_path: Path) -> None:
    directory = _copy_fixture(tmp_path)
    assert load_model(directory).stop_token_ids == ModelConfig.from_pretrained(directory).eos_token_ids
    (directory / "generation_config.json").write_text('{"eos_token_id": [7, 8]}')
    model = load_model(directory)
    assert model.stop_token_ids == (*ModelConfig.from_pretrained(directory).eos_token_ids, 7, 8)
    assert model.checkpoint_dir == directory
    assert type(model) is CogVLM2ForCausalLM and not hasattr(model, "generate")  # the plain engine model
