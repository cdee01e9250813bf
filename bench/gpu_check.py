"""GPU check: full-size CogVLM2 with random bf16 weights, measured through the engine (no download).

What it measures (one run, one process, `bench/gpu_check.sh` wraps it for an H100):
  * build: the model is instantiated on the meta device, cast to the dtype there, materialised
    on the target device with `to_empty` and filled in place with random values (the scale rules
    of `cogvlm_ray.model.tiny.init_tensor`), so 39 GB of bf16 never exist on the host;
  * TTFT of one image request (vision tower + ~2,306-token prefill at 1344 px), cold and with
    the image-feature cache warm; and for a burst of image requests, engine vs the naive loop;
  * decode output tokens/s at batch 1, 8, 32 (text prompts, fixed output length), and the
    naive one-at-a-time loop (the official demo's approach: each request generated to
    completion, with a KV cache, before the next starts);
  * memory (weights, KV cache, peak) and, at batch 1, the fraction of the HBM-bandwidth bound:
    bytes read per decode step (language-path weights + lm_head + the KV of the context)
    divided by the measured step time, over `--peak-bandwidth` (3.35e12 B/s for H100 SXM).

    PYTHONPATH=. python bench/gpu_check.py --device cuda --preset full --output gpu_check.json
    PYTHONPATH=. python bench/gpu_check.py --device cpu --preset tiny  # code-path smoke test on CPU

Run from the repository root; `PYTHONPATH=.` is enough on a machine with only torch and
transformers (the package need not be installed). `bench/gpu_check.sh` sets it.

Prints one JSON document (also written to `--output`); logs progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.contracts import PreparedPrompt
from cogvlm_ray.engine import Engine, EngineConfig, RequestOutput, SamplingParams
from cogvlm_ray.engine.baseline import NaiveLoop
from cogvlm_ray.model.cogvlm import CogVLM2ForCausalLM
from cogvlm_ray.model.random_init import build_random_model
from cogvlm_ray.model.tiny import tiny_config
from cogvlm_ray.model.tiny_tokenizer import write_tokenizer
from cogvlm_ray.preprocess.images import pixel_hash

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.gpu_check")

REAL_CONFIG = REPO / "tests" / "fixtures" / "cogvlm2-tiny" / "real_config.json"
H100_SXM_BANDWIDTH = 3.35e12
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- model ----------------------------------------------------------------------------------
def model_config_for(preset: str) -> ModelConfig:
    return ModelConfig.from_pretrained(REAL_CONFIG) if preset == "full" else tiny_config(preset)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a text-only decode step reads: decoder language path, final norm, lm_head.

    The vision tower, adapter and vision experts are skipped when a batch has no vision tokens;
    of the token embeddings only one row per token is read.
    """

    def is_read(name: str) -> bool:
        in_language_path = name.startswith("model.layers.") and "vision" not in name
        return in_language_path or name in ("model.norm.weight", "lm_head.weight")

    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if is_read(name))


# ---- prompts --------------------------------------------------------------------------------
def text_prompt(config: ModelConfig, num_tokens: int, rng: np.random.Generator) -> PreparedPrompt:
    text_ids = rng.integers(0, config.vocab_size - 256, size=num_tokens).tolist()  # no special ids
    ids = [config.bos_token_id, *text_ids]
    return PreparedPrompt(input_ids=ids, token_type_ids=[0] * len(ids), image=None, image_hash=None)


def image_prompt(config: ModelConfig, num_text_tokens: int, rng: np.random.Generator) -> PreparedPrompt:
    size = config.vision_config.image_size
    image = rng.integers(0, 256, size=(3, size, size), dtype=np.uint8)
    text_ids = rng.integers(0, config.vocab_size - 256, size=num_text_tokens).tolist()
    num_image = config.num_image_tokens
    ids = [config.bos_token_id] + [config.image_token_id] * num_image + text_ids
    types = [0] + [1] * num_image + [0] * num_text_tokens
    return PreparedPrompt(input_ids=ids, token_type_ids=types, image=image, image_hash=pixel_hash(image))


# ---- engine runs ----------------------------------------------------------------------------
class EngineClient:
    """Sends prepared prompts through one engine and collects each request's outputs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._next_id = 0

    async def one(self, prompt: PreparedPrompt, max_tokens: int) -> list[RequestOutput]:
        self._next_id += 1
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, min_tokens=max_tokens
        )
        return [out async for out in self.engine.add_request(prompt, params, f"gpu-check-{self._next_id}")]

    async def together(self, prompts: list[PreparedPrompt], max_tokens: int) -> list[list[RequestOutput]]:
        return list(await asyncio.gather(*(self.one(p, max_tokens) for p in prompts)))


def ttft_s(outputs: list[RequestOutput], since: float | None = None) -> float:
    first = outputs[0]
    assert first.first_token_time is not None
    return first.first_token_time - (since if since is not None else first.arrival_time)


def decode_figures(runs: list[list[RequestOutput]], wall_s: float) -> dict[str, float]:
    """Throughput over the whole run, and steady decode (after every request's first token)."""
    num_tokens = sum(r[-1].num_generated_tokens for r in runs)
    decode_start = max(r[0].first_token_time or r[0].emit_time for r in runs)
    decode_end = max(r[-1].emit_time for r in runs)
    steps = max(r[-1].num_generated_tokens for r in runs) - 1
    decode_tokens = sum(len(o.new_token_ids) for r in runs for o in r if o.emit_time > decode_start)
    decode_s = max(decode_end - decode_start, 1e-9)
    return {
        "num_requests": len(runs),
        "output_tokens": num_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": num_tokens / wall_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "decode_step_ms": 1000.0 * decode_s / max(steps, 1),
    }


async def measure(
    args: argparse.Namespace, model: CogVLM2ForCausalLM, tokenizer: Any, device: torch.device
) -> dict:
    config = model.model_config
    rng = np.random.default_rng(args.seed)
    batches = args.batches
    engine_config = EngineConfig(
        max_num_seqs=max(max(batches), args.image_burst),
        max_num_batched_tokens=max(args.max_batched_tokens, config.num_image_tokens + args.prompt_tokens + 1),
        max_kv_tokens=args.max_kv_tokens,
    )
    engine = Engine(model, tokenizer, engine_config)
    runner = EngineClient(engine)
    out: dict[str, Any] = {
        "engine_config": engine_config.__dict__,
        "kv_capacity_tokens": engine.kv_capacity_tokens,
    }
    try:
        logger.info("warm-up")
        await runner.together([text_prompt(config, args.prompt_tokens, rng) for _ in range(2)], 4)
        await runner.one(image_prompt(config, args.prompt_tokens, rng), 2)

        logger.info("TTFT with one image (cold, then cached)")
        cold, cached = [], []
        for _ in range(args.repeats):
            prompt = image_prompt(config, args.prompt_tokens, rng)
            cold.append(ttft_s(await runner.one(prompt, 1)))
            cached.append(ttft_s(await runner.one(prompt, 1)))
        out["image_prompt_tokens"] = config.num_image_tokens + args.prompt_tokens + 1
        out["ttft_image_cold_ms"] = 1000 * statistics.median(cold)
        out["ttft_image_cached_ms"] = 1000 * statistics.median(cached)

        logger.info("burst of %d image requests: engine vs one-at-a-time", args.image_burst)
        burst = [image_prompt(config, args.prompt_tokens, rng) for _ in range(2 * args.image_burst)]
        start = time.monotonic()
        together = await runner.together(burst[: args.image_burst], args.burst_tokens)
        engine_ttfts = [ttft_s(r, since=start) for r in together]
        naive_loop = NaiveLoop(
            model, max_len=out["image_prompt_tokens"] + max(args.burst_tokens, args.decode_tokens)
        )
        naive_ttfts, elapsed = [], 0.0
        for prompt in burst[args.image_burst :]:  # request k waits for the k-1 before it
            ttft, total, _ = naive_loop.generate(prompt, args.burst_tokens)
            naive_ttfts.append(elapsed + ttft)
            elapsed += total
        out["image_burst"] = {
            "num_requests": args.image_burst,
            "output_tokens_each": args.burst_tokens,
            "engine_mean_ttft_ms": 1000 * statistics.mean(engine_ttfts),
            "naive_mean_ttft_ms": 1000 * statistics.mean(naive_ttfts),
        }

        out["decode"] = {}
        for batch in batches:
            logger.info("decode at batch %d", batch)
            prompts = [text_prompt(config, args.prompt_tokens, rng) for _ in range(batch)]
            start = time.monotonic()
            runs = await runner.together(prompts, args.decode_tokens)
            out["decode"][str(batch)] = decode_figures(runs, time.monotonic() - start)

        logger.info("naive one-at-a-time loop, %d requests", args.naive_requests)
        prompts = [text_prompt(config, args.prompt_tokens, rng) for _ in range(args.naive_requests)]
        wall = sum(naive_loop.generate(prompt, args.decode_tokens)[1] for prompt in prompts)
        naive_tokens = len(prompts) * args.decode_tokens
        out["naive_loop"] = {
            "num_requests": len(prompts),
            "output_tokens": naive_tokens,
            "wall_s": wall,
            "output_tokens_per_s": naive_tokens / wall,
            "image_ttft_ms": 1000
            * statistics.median(
                naive_loop.generate(image_prompt(config, args.prompt_tokens, rng), 1)[0]
                for _ in range(args.repeats)
            ),
        }
        for figures in out["decode"].values():
            figures["speedup_vs_naive"] = (
                figures["output_tokens_per_s"] / out["naive_loop"]["output_tokens_per_s"]
            )
    finally:
        await engine.shutdown(timeout_s=5.0)

    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    kv_bytes_per_token *= model.lm_head.weight.element_size()
    out["kv_cache_gib"] = engine.kv_capacity_tokens * kv_bytes_per_token / 2**30
    if "1" in out["decode"]:  # HBM roofline at batch 1
        mean_context = args.prompt_tokens + 1 + args.decode_tokens / 2
        step_bytes = decode_weight_bytes(model) + kv_bytes_per_token * mean_context
        step_s = out["decode"]["1"]["decode_step_ms"] / 1000
        out["batch1_bytes_per_step"] = step_bytes
        out["batch1_achieved_bandwidth_Bps"] = step_bytes / step_s
        out["batch1_fraction_of_hbm_bound"] = step_bytes / step_s / args.peak_bandwidth
    return out


def memory_report(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
            "device_used_gib": (total - free) / 2**30,
            "device_total_gib": total / 2**30,
        }
    status = Path("/proc/self/status").read_text().splitlines()
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss_gib": kib.get("VmRSS", 0) / 2**20, "peak_rss_gib": kib.get("VmHWM", 0) / 2**20}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument(
        "--preset", default="full", choices=["full", "bench", "tiny"], help="full = real CogVLM2 config"
    )
    p.add_argument(
        "--dtype", default=None, choices=sorted(_DTYPES), help="default bfloat16 (cuda), float32 (cpu)"
    )
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=32, help="text tokens per prompt")
    p.add_argument("--decode-tokens", type=int, default=128, help="output tokens per decode request")
    p.add_argument("--naive-requests", type=int, default=8, help="requests in the one-at-a-time loop")
    p.add_argument(
        "--image-burst", type=int, default=4, help="image requests sent at once (and in the naive loop)"
    )
    p.add_argument("--burst-tokens", type=int, default=16, help="output tokens per burst request")
    p.add_argument("--repeats", type=int, default=3, help="single-image TTFT repeats (median)")
    p.add_argument(
        "--max-kv-tokens", type=int, default=None, help="KV cache size; default 131072 (cuda), 16384 (cpu)"
    )
    p.add_argument("--max-batched-tokens", type=int, default=4096, help="engine per-step token budget")
    p.add_argument(
        "--peak-bandwidth", type=float, default=H100_SXM_BANDWIDTH, help="HBM bytes/s for the roofline"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --preset tiny for a smoke run")
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.max_kv_tokens is None:
        args.max_kv_tokens = 131072 if device.type == "cuda" else 16384
    config = model_config_for(args.preset)
    started = time.monotonic()

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_tokenizer(tokenizer_dir, config.vocab_size)  # Llama-3 layout at the real vocab size
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)

    logger.info("building %s model (%s) on %s", args.preset, dtype, device)
    t0 = time.monotonic()
    model = build_random_model(config, device, dtype, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.monotonic() - t0
    num_params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("built %.2fB parameters (%.1f GB) in %.1f s", num_params / 1e9, weights / 1e9, build_s)
    memory_after_weights = memory_report(device)

    figures = asyncio.run(measure(args, model, tokenizer, device))
    document = {
        "device": device_description(device),
        "preset": args.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "num_parameters": num_params,
        "weight_bytes": weights,
        "decode_weight_bytes": decode_weight_bytes(model),
        "build_s": build_s,
        "memory_after_weights": memory_after_weights,
        "memory_end": memory_report(device),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        **figures,
        "total_s": time.monotonic() - started,
    }
    text = json.dumps(document, indent=2)
    sys.stdout.write(text + "\n")
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
