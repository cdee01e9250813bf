"""GPU check: full-size CogVLM2 with random bf16 weights, measured through the engine as production runs it.

One run, one process, at most 8 minutes (`--max-seconds`, default 420, then the rest is skipped
and listed); the JSON is rewritten after every measurement, so a run stopped early (SIGTERM from
`timeout`, Ctrl-C, even SIGKILL) leaves what it measured, with `"complete": false`.

  * build: meta-device model cast to the dtype there, `to_empty` on the GPU, random values in
    place (`model/random_init.py`): 39 GB of bf16 never exist on the host;
  * decode tokens/s at batch 1, 8, 32, 64 with image contexts (bos + 2306 image positions + 32
    text tokens, ~2.4K tokens each) and with short text prompts, for each mode side by side:
    `sdpa-eager`, `triton-eager`, `triton-graphs` (attention backend x CUDA graphs for decode);
    a mode the checkout cannot run is listed as unavailable;
  * the naive loop (`engine/baseline.py`: one request at a time, batch-1 forward per token);
  * the SDPA kernel PyTorch picks for our decode / prefill calls at these shapes (logged);
  * a decode pass under `torch.cuda.set_sync_debug_mode("warn")`: warnings per step and where;
  * the batch-1 decode step against the HBM bound: language weights read per step / peak
    bandwidth by device name (H100 SXM 3.35 TB/s, H200 4.8 TB/s; `--peak-bandwidth` overrides);
  * TTFT of an image prompt: cold, and the same prompt again (served by the PREFIX cache: the
    KV of every full prompt block is reused, only the last block is recomputed).

    bash bench/gpu_check.sh                                   # writes bench/results/gpu_check.json
    PYTHONPATH=. python3 bench/gpu_check.py --device cpu --tiny --output /tmp/g.json   # CPU dry run

Needs CUDA torch + transformers (+ triton for the triton modes); never imports Ray, FastAPI,
pydantic or Pillow (a unit test checks). Logs progress on stderr; prints the JSON at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_check_parts import (
    Deadline,
    EarlyStop,
    ResultsFile,
    SyncWarningCounter,
    device_description,
    image_prompt,
    memory_report,
    peak_bandwidth_for,
    random_image,
    sdpa_backend_chosen,
    stop_on_signals,
    text_prompt,
)
from cogvlm_ray.config import ModelConfig
from cogvlm_ray.contracts import PreparedPrompt, RequestOutput, SamplingParams
from cogvlm_ray.engine.baseline import NaiveLoop
from cogvlm_ray.engine.config import EngineConfig
from cogvlm_ray.engine.engine import Engine
from cogvlm_ray.model.attention import ATTENTION_BACKENDS
from cogvlm_ray.model.cogvlm import CogVLM2ForCausalLM
from cogvlm_ray.model.random_init import build_random_model
from cogvlm_ray.model.tiny import tiny_config
from cogvlm_ray.model.tiny_tokenizer import write_tokenizer

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.gpu_check")

REAL_CONFIG = REPO / "tests" / "fixtures" / "cogvlm2-tiny" / "real_config.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: mode -> (attention backend, enforce_eager)
MODES = {"sdpa-eager": ("sdpa", True), "triton-eager": ("triton", True), "triton-graphs": ("triton", False)}


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


def mode_unavailable(mode: str, device: torch.device) -> str | None:
    backend, eager = MODES[mode]
    if backend not in ATTENTION_BACKENDS:
        return f"no {backend!r} attention backend in this checkout"
    if backend == "triton" and device.type != "cuda":
        return "triton kernels need CUDA"
    if not eager and device.type != "cuda":
        return "CUDA graphs need CUDA"
    return None


def engine_config(args: argparse.Namespace, mode: str, *, prefix_caching: bool) -> EngineConfig:
    backend, eager = MODES[mode]
    kwargs: dict[str, Any] = dict(
        max_num_seqs=max(args.batches), max_num_batched_tokens=args.max_batched_tokens,
        max_kv_tokens=args.max_kv_tokens, enforce_eager=eager, enable_prefix_caching=prefix_caching,
    )  # fmt: skip
    if "attention_backend" in {f.name for f in dataclasses.fields(EngineConfig)}:
        kwargs["attention_backend"] = backend
    return EngineConfig(**kwargs)


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


def ttft_s(outputs: list[RequestOutput]) -> float:
    assert outputs[0].first_token_time is not None
    return outputs[0].first_token_time - outputs[0].arrival_time


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


def _build_engine(model: CogVLM2ForCausalLM, tokenizer: Any, config: EngineConfig, mode: str) -> Engine:
    model.set_attention_backend(MODES[mode][0])  # checkouts whose EngineConfig has no attention_backend
    return Engine(model, tokenizer, config)


async def measure_mode(ctx: dict[str, Any], mode: str) -> None:
    """Decode at every batch, image contexts then text prompts, plus one sync-debug pass."""
    args, model, results, deadline = ctx["args"], ctx["model"], ctx["results"], ctx["deadline"]
    config, rng, device = model.model_config, np.random.default_rng(args.seed), ctx["device"]
    engine = _build_engine(model, ctx["tokenizer"], engine_config(args, mode, prefix_caching=False), mode)
    client = EngineClient(engine)
    key = f"decode_{mode}"
    results.update(key, "use_cuda_graphs", engine.use_cuda_graphs)
    image = random_image(config, rng)  # one image: the tower runs once, every sequence its own KV
    try:
        await client.together([text_prompt(config, args.prompt_tokens, rng) for _ in range(2)], 4)
        await client.one(image_prompt(config, args.image_text_tokens, rng, image), 2)
        for kind in ("image", "text"):
            for batch in args.batches:
                if deadline.expired():
                    results.update("skipped_for_time", f"{key}/{kind}/{batch}", True)
                    continue
                logger.info("%s: decode at batch %d, %s prompts", mode, batch, kind)
                if kind == "image":
                    prompts = [image_prompt(config, args.image_text_tokens, rng, image) for _ in range(batch)]
                else:
                    prompts = [text_prompt(config, args.prompt_tokens, rng) for _ in range(batch)]
                start = time.monotonic()
                runs = await client.together(prompts, args.decode_tokens)
                figures = decode_figures(runs, time.monotonic() - start)
                figures["context_tokens"] = len(prompts[0].input_ids)
                results.update(key, f"{kind}_batch_{batch}", figures)
        if device.type == "cuda" and not deadline.expired():
            counter, steps_before = SyncWarningCounter(), engine.get_stats().num_steps
            batch = min(8, max(args.batches))
            with counter.watching(device):
                await client.together(
                    [text_prompt(config, args.prompt_tokens, rng) for _ in range(batch)], 16
                )
            results.update(
                key, "sync_debug_warn", counter.report(engine.get_stats().num_steps - steps_before)
            )
    finally:
        await engine.shutdown(timeout_s=5.0)
        results.update(key, "memory", memory_report(device))
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


async def measure_ttft(ctx: dict[str, Any], mode: str) -> None:
    """TTFT of an image prompt: cold (new image), then the same prompt again (prefix cache)."""
    args, model, results = ctx["args"], ctx["model"], ctx["results"]
    config, rng = model.model_config, np.random.default_rng(args.seed + 1)
    engine = _build_engine(model, ctx["tokenizer"], engine_config(args, mode, prefix_caching=True), mode)
    client = EngineClient(engine)
    try:
        await client.one(image_prompt(config, args.image_text_tokens, rng), 2)  # warm-up
        cold, again = [], []
        for _ in range(args.repeats):
            prompt = image_prompt(config, args.image_text_tokens, rng)
            cold.append(ttft_s(await client.one(prompt, 1)))
            again.append(ttft_s(await client.one(prompt, 1)))
        results.set("ttft", {
            "mode": mode,
            "image_prompt_tokens": len(prompt.input_ids),
            "image_cold_ms": 1000 * statistics.median(cold),
            "image_same_prompt_again_prefix_cache_ms": 1000 * statistics.median(again),
            "note": "'again' is served by the prefix cache: every full block of the prompt (image "
            "included) is reused, the vision tower does not run, only the last block is prefilled",
        })  # fmt: skip
    finally:
        await engine.shutdown(timeout_s=5.0)
        del engine


def measure_naive(ctx: dict[str, Any]) -> None:
    args, model, results = ctx["args"], ctx["model"], ctx["results"]
    config, rng = model.model_config, np.random.default_rng(args.seed + 2)
    model.set_attention_backend("sdpa")
    image_len = 1 + config.num_image_tokens + args.image_text_tokens
    naive = NaiveLoop(model, max_len=image_len + args.decode_tokens + 16)
    out: dict[str, Any] = {
        "attention_backend": "sdpa",
        "what": "one request at a time, batch-1 forward per token",
    }
    for kind in ("text", "image"):
        prompts = [
            image_prompt(config, args.image_text_tokens, rng)
            if kind == "image"
            else text_prompt(config, args.prompt_tokens, rng)
            for _ in range(args.naive_requests)
        ]
        runs = [naive.generate(prompt, args.decode_tokens) for prompt in prompts]
        decode_s = sum(total - ttft for ttft, total, _ in runs)
        out[kind] = {
            "num_requests": len(runs),
            "output_tokens_per_s": len(runs) * args.decode_tokens / sum(total for _, total, _ in runs),
            "decode_step_ms": 1000 * decode_s / (len(runs) * max(args.decode_tokens - 1, 1)),
            "ttft_ms": 1000 * statistics.median(ttft for ttft, _, _ in runs),
        }
        results.set("naive_loop", out)
    del naive


def derived_figures(
    document: dict[str, Any], weight_bytes: int, peak_bandwidth: float | None
) -> dict[str, Any]:
    """HBM-bound fraction of batch-1 decode, and speed-ups against sdpa-eager and the naive loop."""
    out: dict[str, Any] = {}
    bound_ms = 1000 * weight_bytes / peak_bandwidth if peak_bandwidth else None
    out["batch1_hbm_bound_step_ms"] = bound_ms
    naive = document.get("naive_loop", {})
    base = document.get("decode_sdpa-eager", {})
    for mode in MODES:
        figures = document.get(f"decode_{mode}", {})
        for kind in ("text", "image"):
            one = figures.get(f"{kind}_batch_1")
            if one and bound_ms:
                out[f"{mode}/{kind}_batch_1_fraction_of_hbm_bound"] = bound_ms / one["decode_step_ms"]
            for batch_key, row in figures.items():
                if not batch_key.startswith(f"{kind}_batch_"):
                    continue
                if batch_key in base:
                    out[f"{mode}/{batch_key}_vs_sdpa_eager"] = (
                        row["decode_tokens_per_s"] / base[batch_key]["decode_tokens_per_s"]
                    )
                if kind in naive:
                    out[f"{mode}/{batch_key}_vs_naive"] = (
                        row["output_tokens_per_s"] / naive[kind]["output_tokens_per_s"]
                    )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--preset", default="full", choices=["full", "bench", "tiny"], help="full = real CogVLM2")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny (CPU dry run)")
    p.add_argument(
        "--dtype", default=None, choices=sorted(_DTYPES), help="default bfloat16 (cuda), float32 (cpu)"
    )
    p.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {sorted(MODES)}")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens of a text prompt")
    p.add_argument("--image-text-tokens", type=int, default=32, help="text tokens after the image")
    p.add_argument("--decode-tokens", type=int, default=64, help="output tokens per decode request")
    p.add_argument("--naive-requests", type=int, default=2, help="requests per kind in the naive loop")
    p.add_argument("--repeats", type=int, default=3, help="image TTFT repeats (median)")
    p.add_argument("--max-kv-tokens", type=int, default=None, help="KV size; default fits the largest batch")
    p.add_argument("--max-batched-tokens", type=int, default=8192, help="engine per-step token budget")
    p.add_argument("--peak-bandwidth", type=float, default=None, help="HBM bytes/s; default by device name")
    p.add_argument("--max-seconds", type=float, default=420.0, help="skip what would start after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="the JSON file, rewritten after every measurement")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown or any(b < 1 for b in args.batches):
        raise SystemExit(f"unknown modes {sorted(unknown)} or a batch < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --tiny for a dry run")
    deadline = Deadline(args.max_seconds)
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    config = model_config_for(args.preset)
    image_len = 1 + config.num_image_tokens + args.image_text_tokens
    if args.max_kv_tokens is None:
        args.max_kv_tokens = max(args.batches) * (image_len + args.decode_tokens + 16) + 4096
    results = ResultsFile(args.output, {"device": device_description(device), "preset": args.preset,
                                        "dtype": str(dtype).removeprefix("torch."), "settings": vars(args)})  # fmt: skip
    started = time.monotonic()
    with stop_on_signals():
        try:
            run(args, device, dtype, config, results, deadline)
            results.set("complete", True)
        except EarlyStop as stop:
            logger.warning("stopped early (%s); the JSON holds what was measured", stop)
            results.set("stopped_early", str(stop))
        finally:
            results.set("total_s", time.monotonic() - started)
    sys.stdout.write(results.text() + "\n")
    return 0 if results.document["complete"] else 1


def run(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, config: ModelConfig,
    results: ResultsFile, deadline: Deadline,
) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_tokenizer(tokenizer_dir, config.vocab_size)  # Llama-3 layout at the real vocab size
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    logger.info("building %s model (%s) on %s", args.preset, dtype, device)
    t0 = time.monotonic()
    model = build_random_model(config, device, dtype, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    weight_bytes = decode_weight_bytes(model)
    peak = args.peak_bandwidth or (
        peak_bandwidth_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    results.set("model", {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "decode_weight_bytes": weight_bytes, "build_s": time.monotonic() - t0,
        "memory_after_weights": memory_report(device),
    })  # fmt: skip
    results.set("peak_bandwidth_Bps", peak)
    image_len = 1 + config.num_image_tokens + args.image_text_tokens
    chosen = sdpa_backend_chosen(device, dtype, config, batch=8, context=image_len)
    logger.info("SDPA kernels chosen at these shapes: %s", chosen)
    results.set("sdpa_backend_chosen", chosen)

    ctx = {"args": args, "model": model, "tokenizer": tokenizer, "results": results, "deadline": deadline,
           "device": device}  # fmt: skip
    runnable = []
    for mode in args.modes:
        why = mode_unavailable(mode, device)
        if why:
            results.update("modes_unavailable", mode, why)
        else:
            runnable.append(mode)
    for mode in runnable:
        if deadline.expired():
            results.update("skipped_for_time", mode, True)
            continue
        asyncio.run(measure_mode(ctx, mode))
    if runnable and not deadline.expired():
        asyncio.run(measure_ttft(ctx, runnable[-1]))
    if not deadline.expired():
        measure_naive(ctx)
    results.set("derived", derived_figures(results.document, weight_bytes, peak))
    results.set("memory_end", memory_report(device))


if __name__ == "__main__":
    raise SystemExit(main())
