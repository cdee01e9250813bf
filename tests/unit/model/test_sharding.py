"""Device maps for one replica over several devices, computed on a meta model with fake budgets."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import convert_file_size_to_int

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.model import CogVLM2ForCausalLM, load_model
from cogvlm_ray.model.loading import build_meta_model
from cogvlm_ray.model.sharding import device_for, normalize_device, resolve_device_map

from .conftest import FIXTURE_DIR, PagedRunner, assert_close_golden, load_case, prompt_inputs


@pytest.fixture(scope="module")
def real_meta_model() -> CogVLM2ForCausalLM:
    """The full 19B architecture on the meta device (no memory)."""
    config = ModelConfig.from_dict(json.loads((FIXTURE_DIR / "real_config.json").read_text()))
    return build_meta_model(config)


def _placements(model: CogVLM2ForCausalLM, device_map: dict) -> dict[str, torch.device]:
    return {key: device_for(key, device_map) for key in model.state_dict()}


def _assert_units_not_split(model: CogVLM2ForCausalLM, placed: dict[str, torch.device]) -> None:
    prefixes = [f"model.layers.{i}." for i in range(len(model.model.layers))]
    prefixes += [
        f"model.vision.transformer.layers.{i}." for i in range(len(model.model.vision.transformer.layers))
    ]
    prefixes += ["model.vision.linear_proj.", "model.vision.patch_embedding."]
    for prefix in prefixes:
        devices = {d for k, d in placed.items() if k.startswith(prefix)}
        assert len(devices) == 1, f"{prefix} split over {devices}"


@pytest.mark.parametrize(
    ("strategy", "max_memory", "expected_devices"),
    [
        ("auto", {0: "23GiB", 1: "23GiB"}, {"cuda:0", "cuda:1"}),  # the official 2-GPU demo budget
        ("balanced", {0: "15GiB", 1: "15GiB", 2: "15GiB"}, {"cuda:0", "cuda:1", "cuda:2"}),
        ("sequential", {0: "30GiB", 1: "30GiB"}, {"cuda:0", "cuda:1"}),
        ("auto", {0: "80GiB"}, {"cuda:0"}),
        ("auto", {0: "20GiB", "cpu": "64GiB"}, {"cuda:0", "cpu"}),
    ],
)
def test_device_maps_for_fake_budgets(
    real_meta_model: CogVLM2ForCausalLM, strategy: str, max_memory: dict, expected_devices: set[str]
) -> None:
    device_map = resolve_device_map(real_meta_model, strategy, max_memory, torch.bfloat16)
    placed = _placements(real_meta_model, device_map)
    assert {str(d) for d in placed.values()} == expected_devices
    _assert_units_not_split(real_meta_model, placed)
    # Bytes per device stay inside each budget.
    budget = {str(normalize_device(k)): v for k, v in max_memory.items()}
    used: dict[str, int] = {}
    for key, tensor in real_meta_model.state_dict().items():
        used[str(placed[key])] = used.get(str(placed[key]), 0) + tensor.numel() * 2
    for device, num_bytes in used.items():
        assert num_bytes <= convert_file_size_to_int(budget[device]), (device, num_bytes)


def test_budget_too_small_is_rejected(real_meta_model: CogVLM2ForCausalLM) -> None:
    with pytest.raises(ValueError, match="disk"):
        resolve_device_map(real_meta_model, "auto", {0: "10GiB", 1: "10GiB"}, torch.bfloat16)


def test_explicit_map_must_cover_every_tensor(real_meta_model: CogVLM2ForCausalLM) -> None:
    with pytest.raises(ValueError, match="does not place"):
        resolve_device_map(real_meta_model, {"model.layers": "cpu", "lm_head": "cpu"}, None, torch.bfloat16)


def test_explicit_per_module_map_loads_runs_and_matches() -> None:
    device_map = {
        "model.vision": "cpu",
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": torch.device("cpu"),
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = load_model(FIXTURE_DIR, dtype=torch.float32, device_map=device_map)
    assert model.hf_device_map == device_map
    assert model.kv_cache_layout() == [(torch.device("cpu"), torch.float32)] * 2
    case = load_case("chat_image")
    hidden = PagedRunner(model).step([("s", prompt_inputs(model, case))])[0]
    assert_close_golden(model.compute_logits(hidden), case["logits"], "logits")


def test_single_device_string() -> None:
    model = load_model(FIXTURE_DIR, device_map="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="disk"):
        normalize_device("disk")
