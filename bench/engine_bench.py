"""Engine benchmark: continuous batching vs one request at a time, and image-cache TTFT.

    python bench/engine_bench.py [--threads 1] [--min-requests 4] [--requests-per-client 2]
                                 [--max-tokens 128] [--levels 1,8,32] [--json out.json]

One process, one random CogVLM2 checkpoint of realistic proportions sized for CPU
(`make_tiny_checkpoint(preset="bench")`: LM hidden 512, 8 layers, 8 heads / 2 KV heads,
MLP 1792, vocab 4096; vision 224 px, patch 14, hidden 256, 4 layers -> 66 image positions),
float32 on CPU.

* Baseline = the official demo's approach: one request at a time, generated to completion
  with a KV cache (our model's paged decode, batch 1, no engine: vision tower, one prefill,
  then one `forward_flat` per token, greedy).
  Measured over `--min-requests` requests (tokens/s is a rate; every request costs the same).
* Engine: for each `c` in `--levels`, `c` concurrent clients each send requests one after
  another (closed loop), max(`--min-requests`, c * `--requests-per-client`) requests in all.
  Every request has its own new image (neither cache can help) and produces exactly
  `--max-tokens` tokens (ignore_eos; 128 = a short chat answer, the official demos allow 1024-2048).
  Tokens/s = all generated tokens / wall time.
* Step costs: CPU ms of one runner step at batch 1 and 32 (prefill per request, decode per
  token), from which the ratio at any output length follows.
* TTFT: on an idle engine, a new image vs the same image again with another question
  (median of `--ttft-repeats`). The repeat is served by the prefix cache (the blocks holding
  bos + image) and the image-feature cache (image rows in the first partial block); measured
  again with prefix caching off (the image-feature cache alone), and on the same LM with
  448-px images (258 image positions) to show how the ratio moves with the image's share
  of the prompt (the real model: 2306 of ~2330 positions).

Wall-clock figures on a shared machine move with the load, so each throughput row also reports
tokens per CPU-second of this process (all threads), which is what an idle core would see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import PreparedPrompt
from cogvlm_ray.engine import Engine, EngineConfig, SamplingParams
from cogvlm_ray.engine.baseline import NaiveLoop
from cogvlm_ray.model import load_model
from cogvlm_ray.model.tiny import make_tiny_checkpoint
from cogvlm_ray.preprocess.images import pixel_hash
from cogvlm_ray.preprocess.prompt import build_prompt_ids

logger = logging.getLogger("engine_bench")

QUESTIONS = [
    "What is in this picture?",
    "Describe the image in detail.",
    "How many red squares are there?",
    "Where is the cat?",
    "What colour is the square?",
    "Is there any text in the image?",
]


@dataclass
class Bench:
    model: object
    tokenizer: PreTrainedTokenizerFast
    max_tokens: int

    def prompt(self, image_seed: int, question: int) -> PreparedPrompt:
        config = self.model.model_config
        size = config.vision_config.image_size
        image = np.random.default_rng(image_seed).integers(0, 256, (3, size, size), dtype=np.uint8)
        ids, types = build_prompt_ids(
            self.tokenizer, config, query=QUESTIONS[question % len(QUESTIONS)], has_image=True
        )
        return PreparedPrompt(ids, types, image, pixel_hash(image))

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)


def baseline(bench: Bench, prompts: list[PreparedPrompt]) -> dict[str, float]:
    """One request at a time to completion: vision tower, prefill, then batch-1 cached decode."""
    max_len = max(p.num_prompt_tokens for p in prompts) + bench.max_tokens
    naive = NaiveLoop(bench.model, max_len)
    start, cpu_start = time.perf_counter(), time.process_time()
    ttfts = [naive.generate(prompt, bench.max_tokens)[0] for prompt in prompts]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = len(prompts) * bench.max_tokens
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / cpu,
        "mean_ttft_s": statistics.mean(ttfts),
    }


def make_engine(bench: Bench, enable_prefix_caching: bool = True) -> Engine:
    config = EngineConfig(max_num_seqs=32, max_kv_tokens=32768, enable_prefix_caching=enable_prefix_caching)
    return Engine(bench.model, bench.tokenizer, config)


async def engine_level(bench: Bench, prompts: list[PreparedPrompt], concurrency: int) -> dict[str, float]:
    engine = make_engine(bench)
    await engine.start()
    ttfts: list[float] = []
    batch_sizes: list[int] = []

    async def client(mine: list[tuple[int, PreparedPrompt]]) -> int:
        produced = 0
        for index, prompt in mine:
            async for out in engine.add_request(prompt, bench.params(), f"c{concurrency}-{index}"):
                produced += len(out.new_token_ids)
                batch_sizes.append(engine.get_stats().batch_size)
                if out.finished and out.first_token_time is not None:
                    ttfts.append(out.first_token_time - out.arrival_time)
        return produced

    shares = [list(enumerate(prompts))[i::concurrency] for i in range(concurrency)]
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = sum(await asyncio.gather(*(client(s) for s in shares)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    steps = engine.get_stats().num_steps
    await engine.shutdown()
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / cpu,
        "mean_ttft_s": statistics.mean(ttfts),
        "mean_batch_size": statistics.mean(batch_sizes),
        "steps": steps,
    }


async def ttft_cold_vs_cached(bench: Bench, repeats: int, enable_prefix_caching: bool) -> dict[str, float]:
    """Median TTFT (wall, and CPU time of the process while the otherwise idle engine serves it)."""
    engine = make_engine(bench, enable_prefix_caching)
    await engine.start()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    async def ttft(prompt: PreparedPrompt, request_id: str, expect_hit: bool) -> tuple[float, float]:
        cpu_start = time.process_time()
        outputs = [o async for o in engine.add_request(prompt, params, request_id)]
        assert outputs[-1].image_cache_hit is expect_hit
        return outputs[-1].first_token_time - outputs[-1].arrival_time, time.process_time() - cpu_start

    cold, cached = [], []
    for i in range(repeats):
        cold.append(await ttft(bench.prompt(10_000 + i, 0), f"cold-{i}", False))
        cached.append(await ttft(bench.prompt(10_000 + i, 1), f"cached-{i}", True))
    await engine.shutdown()
    cold_s, cached_s = statistics.median(w for w, _ in cold), statistics.median(w for w, _ in cached)
    cold_cpu, cached_cpu = statistics.median(c for _, c in cold), statistics.median(c for _, c in cached)
    return {
        "cold_ttft_s": cold_s,
        "cached_ttft_s": cached_s,
        "ratio": cached_s / cold_s,
        "cold_cpu_s": cold_cpu,
        "cached_cpu_s": cached_cpu,
        "ratio_cpu": cached_cpu / cold_cpu,
    }


def step_costs(bench: Bench, batch_sizes: tuple[int, ...] = (1, 32), num_decode_steps: int = 10) -> dict:
    """CPU milliseconds of one engine step (runner only): prefill per request and decode per token.

    Explains the throughput ratios: continuous batching divides the decode cost per token by
    the batch, while on a CPU the prefill (compute-bound) only gains what batching the GEMMs gives.
    """
    out = {}
    for batch in batch_sizes:
        engine = make_engine(bench)
        params = SamplingParams(max_tokens=num_decode_steps + 4, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(bench.prompt(50_000 + batch * 100 + i, i), params, f"s{batch}-{i}")

        def step(engine: Engine = engine) -> float:
            scheduled = engine.scheduler.schedule()
            start = time.process_time()
            sampled = engine.runner.execute(scheduled)
            elapsed = time.process_time() - start
            engine.scheduler.update_from_output(scheduled, sampled)
            return elapsed

        prefill = step()
        step()  # first decode warms up
        decode = statistics.median(step() for _ in range(num_decode_steps))
        out[batch] = {
            "prefill_ms_per_request": 1e3 * prefill / batch,
            "decode_ms_per_token": 1e3 * decode / batch,
        }
    return out


def load_bench(image_size: int, max_tokens: int) -> Bench:
    """The "bench" preset (random weights, float32), optionally with another image size."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_tiny_checkpoint(
            tmp, preset="bench", seed=0, vision_overrides={"image_size": image_size}
        )
        model = load_model(directory, dtype=torch.float32)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    config = model.model_config
    logger.info(
        "model: LM hidden %d, %d layers, %d heads / %d KV heads, MLP %d, vocab %d; vision %d px, hidden %d, "
        "%d layers -> %d image positions",
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
        config.intermediate_size, config.vocab_size, config.vision_config.image_size,
        config.vision_config.hidden_size, config.vision_config.num_hidden_layers, config.num_image_tokens,
    )  # fmt: skip
    return Bench(model, tokenizer, max_tokens)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--ttft-repeats", type=int, default=9)
    parser.add_argument("--ttft-image-sizes", default="224,448", help="448 = same LM, 258 image positions")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    bench = load_bench(224, args.max_tokens)
    model, tokenizer = bench.model, bench.tokenizer
    warm = Bench(model, tokenizer, 4)
    baseline(warm, [warm.prompt(1, 0)])  # warm up kernels and allocator
    asyncio.run(engine_level(warm, [warm.prompt(2, 0), warm.prompt(3, 1)], 2))

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "max_tokens": args.max_tokens,
        "prompt_tokens": bench.prompt(0, 0).num_prompt_tokens,
    }
    results["step_costs_cpu"] = costs = step_costs(bench)
    for batch, row in costs.items():
        logger.info(
            "step cost at batch %d: prefill %.1f CPU-ms per request, decode %.2f CPU-ms per token",
            batch, row["prefill_ms_per_request"], row["decode_ms_per_token"],
        )  # fmt: skip
    prompts = [bench.prompt(100 + i, i) for i in range(args.min_requests)]
    results["baseline"] = baseline(bench, prompts)
    logger.info(
        "baseline (one at a time): %.1f tok/s, %.1f tok/CPU-s",
        results["baseline"]["tokens_per_s"], results["baseline"]["tokens_per_cpu_s"],
    )  # fmt: skip
    results["engine"] = []
    for level, concurrency in enumerate(int(c) for c in args.levels.split(",")):
        num_requests = max(args.min_requests, concurrency * args.requests_per_client)
        level_prompts = [bench.prompt(1000 * (level + 1) + i, i) for i in range(num_requests)]
        row = asyncio.run(engine_level(bench, level_prompts, concurrency))
        row["speedup"] = row["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        row["speedup_cpu"] = row["tokens_per_cpu_s"] / results["baseline"]["tokens_per_cpu_s"]
        results["engine"].append(row)
        logger.info(
            "engine c=%d: %.1f tok/s (%.2fx baseline), %.1f tok/CPU-s (%.2fx), mean TTFT %.3f s, mean batch %.1f",
            concurrency, row["tokens_per_s"], row["speedup"], row["tokens_per_cpu_s"], row["speedup_cpu"],
            row["mean_ttft_s"], row["mean_batch_size"],
        )  # fmt: skip
    results["ttft"] = []
    for image_size in (int(s) for s in args.ttft_image_sizes.split(",")):
        ttft_bench = bench if image_size == 224 else load_bench(image_size, 1)
        for prefix_caching in (True, False):
            row = asyncio.run(ttft_cold_vs_cached(ttft_bench, args.ttft_repeats, prefix_caching))
            row.update(image_size=image_size, prefix_caching=prefix_caching,
                       prompt_tokens=ttft_bench.prompt(0, 0).num_prompt_tokens)  # fmt: skip
            results["ttft"].append(row)
            logger.info(
                "TTFT %d px (%d prompt tokens), prefix cache %s: new image %.1f ms, repeated %.1f ms (%.2fx); "
                "CPU %.1f vs %.1f ms (%.2fx)",
                image_size, row["prompt_tokens"], "on" if prefix_caching else "off", row["cold_ttft_s"] * 1e3,
                row["cached_ttft_s"] * 1e3, row["ratio"], row["cold_cpu_s"] * 1e3, row["cached_cpu_s"] * 1e3,
                row["ratio_cpu"],
            )  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
