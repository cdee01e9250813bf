"""bench/gpu_check.py on CPU: the full-size build plan (meta device) and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from cogvlm_ray.model.tiny import rotary_inv_freq

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_config_plan_matches_the_published_sizes(gpu_check):
    """On meta (no memory): 19.5B parameters; a text decode step reads 15.0 GB of bf16 weights."""
    config = gpu_check.model_config_for("full")
    with torch.device("meta"):
        model = gpu_check.CogVLM2ForCausalLM(config)
    model.to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 19_503_105_280  # the published parameter count
    # Llama-3-8B part (8,030,261,248) minus the token embeddings (128256 x 4096), in bf16.
    assert gpu_check.decode_weight_bytes(model) == (8_030_261_248 - 128_256 * 4096) * 2


def test_random_build_is_finite_and_runs_on_cpu(gpu_check):
    config = gpu_check.model_config_for("tiny")
    model = gpu_check.build_random_model(config, torch.device("cpu"), torch.float32, seed=0)
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    norm = model.model.layers[0].input_layernorm.weight
    assert abs(norm.mean().item() - 1.0) < 0.1
    inv_freq = model.model.layers[0].self_attn.rotary_emb.inv_freq
    assert torch.equal(inv_freq, rotary_inv_freq(config, inv_freq.dtype))
    again = gpu_check.build_random_model(config, torch.device("cpu"), torch.float32, seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded


def test_naive_loop_generates_what_the_engine_generates(gpu_check, tmp_path):
    """The baseline computes the same greedy tokens as the engine, so the comparison is like for like."""
    import asyncio

    import numpy as np
    from transformers import PreTrainedTokenizerFast

    config = gpu_check.model_config_for("tiny")
    model = gpu_check.build_random_model(config, torch.device("cpu"), torch.float32, seed=1)
    gpu_check.write_tokenizer(tmp_path, config.vocab_size)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [gpu_check.image_prompt(config, 5, rng), gpu_check.text_prompt(config, 7, rng)]
    naive = gpu_check.NaiveLoop(model, max_len=64)
    expected = [naive.generate(prompt, 6)[2] for prompt in prompts]

    async def engine_tokens() -> list[list[int]]:
        engine = gpu_check.Engine(model, tokenizer, gpu_check.EngineConfig(max_num_seqs=2, max_kv_tokens=512))
        try:
            runs = await gpu_check.EngineClient(engine).together(prompts, 6)
        finally:
            await engine.shutdown(timeout_s=1.0)
        return [[t for out in run for t in out.new_token_ids] for run in runs]

    assert asyncio.run(engine_tokens()) == expected


def test_tiny_cpu_run_reports_every_figure(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main([
        "--device", "cpu", "--preset", "tiny", "--batches", "1,4", "--decode-tokens", "6",
        "--naive-requests", "2", "--image-burst", "2", "--burst-tokens", "3", "--repeats", "1",
        "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc == json.loads(capsys.readouterr().out)
    assert set(doc["decode"]) == {"1", "4"}
    assert doc["decode"]["4"]["output_tokens"] == 4 * 6  # ignore_eos: exactly max_tokens each
    assert doc["naive_loop"]["output_tokens"] == 2 * 6 and doc["naive_loop"]["image_ttft_ms"] > 0
    assert doc["decode"]["4"]["speedup_vs_naive"] > 0
    for key in ("ttft_image_cold_ms", "ttft_image_cached_ms", "batch1_fraction_of_hbm_bound", "kv_cache_gib"):
        assert math.isfinite(doc[key]) and doc[key] > 0, key
    burst = doc["image_burst"]
    assert burst["engine_mean_ttft_ms"] > 0 and burst["naive_mean_ttft_ms"] > 0
    assert doc["image_prompt_tokens"] == 1 + (56 // 14 // 2) ** 2 + 2 + 32
    assert doc["memory_end"]["peak_rss_gib"] > 0
