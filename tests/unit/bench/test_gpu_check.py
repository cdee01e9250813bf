"""bench/gpu_check.py on CPU: the full-size build plan, arguments, the bandwidth table, the JSON on
early stop, the import boundary (no Ray / FastAPI / pydantic / Pillow) and a tiny dry run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cogvlm_ray.model.tiny import rotary_inv_freq

REPO = Path(__file__).resolve().parents[3]
BLOCKED = (
    "ray", "fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "httpx", "aiohttp",
    "openai", "PIL", "xgrammar", "jsonschema",
)  # fmt: skip
# Runs the script with those packages unimportable, as on a machine with only torch + transformers.
BLOCKING_RUNNER = f"""
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError("blocked: " + name, name=name)
sys.meta_path.insert(0, Blocker())
sys.argv = ["bench/gpu_check.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""
DRY_RUN = ["--device", "cpu", "--tiny", "--batches", "1,3", "--decode-tokens", "5", "--repeats", "1",
           "--naive-requests", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_full_config_plan_matches_the_published_sizes(gpu_check):
    """On meta (no memory): 19.5B parameters; a text decode step reads 15.0 GB of bf16 weights."""
    config = gpu_check.model_config_for("full")
    with torch.device("meta"):
        model = gpu_check.CogVLM2ForCausalLM(config)
    model.to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 19_503_105_280  # the published parameter count
    # Llama-3-8B part (8,030,261,248) minus the token embeddings (128256 x 4096), in bf16.
    assert gpu_check.decode_weight_bytes(model) == (8_030_261_248 - 128_256 * 4096) * 2
    assert config.num_image_tokens == 2306  # the image context of the decode figures: 2306 + 33 tokens


def test_random_build_is_finite_and_seeded(gpu_check):
    config = gpu_check.model_config_for("tiny")
    model = gpu_check.build_random_model(config, torch.device("cpu"), torch.float32, seed=0)
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    inv_freq = model.model.layers[0].self_attn.rotary_emb.inv_freq
    assert torch.equal(inv_freq, rotary_inv_freq(config, inv_freq.dtype))
    again = gpu_check.build_random_model(config, torch.device("cpu"), torch.float32, seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


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


def test_arguments(gpu_check):
    args = gpu_check.parse_args(["--tiny", "--batches", "1,8", "--modes", "sdpa-eager"])
    assert args.preset == "tiny" and args.batches == [1, 8] and args.modes == ["sdpa-eager"]
    defaults = gpu_check.parse_args([])
    assert defaults.batches == [1, 8, 32, 64] and defaults.preset == "full" and defaults.max_seconds <= 480
    assert defaults.modes == ["sdpa-eager", "triton-eager", "triton-graphs"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--modes", "fast"])


def test_peak_bandwidth_by_device_name(gpu_check):
    peak = gpu_check.peak_bandwidth_for
    assert peak("NVIDIA H200") == 4.8e12
    assert peak("NVIDIA H100 80GB HBM3") == 3.35e12  # SXM
    assert peak("NVIDIA H100 PCIe") == 2.0e12
    assert peak("NVIDIA GeForce RTX 4090") is None


def test_hbm_fraction_and_speedups(gpu_check):
    document = {
        "decode_sdpa-eager": {"text_batch_1": {"decode_step_ms": 10.0, "decode_tokens_per_s": 100.0,
                                               "output_tokens_per_s": 90.0}},
        "decode_triton-graphs": {"text_batch_1": {"decode_step_ms": 4.0, "decode_tokens_per_s": 250.0,
                                                  "output_tokens_per_s": 225.0}},
        "naive_loop": {"text": {"output_tokens_per_s": 45.0}},
    }  # fmt: skip
    out = gpu_check.derived_figures(document, weight_bytes=int(15e9), peak_bandwidth=4.8e12)
    assert out["batch1_hbm_bound_step_ms"] == pytest.approx(3.125)
    assert out["triton-graphs/text_batch_1_fraction_of_hbm_bound"] == pytest.approx(3.125 / 4.0)
    assert out["triton-graphs/text_batch_1_vs_sdpa_eager"] == pytest.approx(2.5)
    assert out["triton-graphs/text_batch_1_vs_naive"] == pytest.approx(5.0)
    assert gpu_check.derived_figures(document, 1, None)["batch1_hbm_bound_step_ms"] is None


def test_results_file_is_rewritten_after_every_figure_and_early_stop_is_recorded(
    gpu_check, tmp_path, monkeypatch
):
    path = tmp_path / "out.json"
    results = gpu_check.ResultsFile(path, {"device": "x"})
    results.update("decode_sdpa-eager", "text_batch_1", {"decode_step_ms": 1.0})
    assert json.loads(path.read_text())["decode_sdpa-eager"]["text_batch_1"]["decode_step_ms"] == 1.0

    def measured_then_killed(args, device, dtype, config, results, deadline):
        results.set("model", {"num_parameters": 1})
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(gpu_check, "run", measured_then_killed)
    before = signal.getsignal(signal.SIGTERM)  # Ray, if a suite started it, installs its own
    assert gpu_check.main(["--device", "cpu", "--tiny", "--output", str(path)]) == 1
    doc = json.loads(path.read_text())
    assert doc["complete"] is False and doc["stopped_early"] == "SIGTERM"
    assert doc["model"] == {"num_parameters": 1} and doc["total_s"] >= 0
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is removed afterwards


def test_dry_run_without_ray_fastapi_pydantic_or_pillow(tmp_path):
    """The tiny model on CPU through the real script, in a fresh python3 that cannot import them."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKING_RUNNER, *DRY_RUN, "--output", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc == json.loads(proc.stdout)
    assert doc["complete"] is True
    decode = doc["decode_sdpa-eager"]
    assert decode["use_cuda_graphs"] is False
    for kind, context in (("image", 1 + 6 + 32), ("text", 33)):
        for batch in (1, 3):
            figures = decode[f"{kind}_batch_{batch}"]
            assert figures["output_tokens"] == batch * 5 and figures["context_tokens"] == context
            assert math.isfinite(figures["decode_step_ms"]) and figures["decode_step_ms"] > 0
    assert set(doc["modes_unavailable"]) == {"triton-eager", "triton-graphs"}  # CPU, no CUDA
    assert doc["ttft"]["image_cold_ms"] > 0 and "prefix cache" in doc["ttft"]["note"]
    assert doc["ttft"]["image_same_prompt_again_prefix_cache_ms"] > 0
    assert doc["naive_loop"]["image"]["output_tokens_per_s"] > 0
    assert doc["derived"]["sdpa-eager/image_batch_3_vs_naive"] > 0
    assert set(doc["sdpa_backend_chosen"]) == {
        "decode_gqa_masked",
        "decode_repeated_kv_masked",
        "prefill_gqa_causal",
    }
    assert doc["peak_bandwidth_Bps"] is None  # no table entry for a CPU


@pytest.mark.slow  # ~40 s on the shared CI machine; the in-process early-stop test above is in the default run
def test_sigterm_mid_run_leaves_the_measured_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    args = [*DRY_RUN, "--batches", "1,2,3,4,5,6,7,8", "--decode-tokens", "300", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "bench/gpu_check.py", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and "decode_sdpa-eager" in json.loads(out.read_text()):  # the engine is up
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    doc = json.loads(out.read_text())
    assert proc.returncode == 1 and doc["complete"] is False and doc["stopped_early"] == "SIGTERM"
    assert doc["model"]["num_parameters"] > 0 and "sdpa_backend_chosen" in doc  # measured before the stop
    assert "memory" in doc["decode_sdpa-eager"] and json.loads(stdout) == doc  # the engine shut down cleanly
