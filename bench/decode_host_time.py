"""Host time of one engine decode step on a tiny-width, real-depth CogVLM2 (CPU).

    python bench/decode_host_time.py [--layers 32] [--batches 1,8] [--steps 40] [--backend sdpa]
                                     [--prompt-tokens 200] [--json out.json]

With hidden 64 the arithmetic is negligible, so the time of `ModelRunner.execute` for a decode
step is the host overhead of the step: building the step metadata, Python and aten dispatch of
every op in every layer, and the sampler. That overhead is what a GPU step pays on top of the
weight reads (on a GPU it also includes every host sync). The model is the "tiny" preset
(hidden 64, 4 heads / 2 KV heads, head_dim 16) with `--layers` decoder layers, float32, one
thread. Each batch size runs `--steps` decode steps after its prompts are prefilled and
reports the median wall and CPU (this thread) milliseconds per step, the minimum CPU time (the
step least disturbed by other processes on a shared machine), and the number of aten ops
one decode step dispatches (counted by a `TorchDispatchMode`; deterministic, unlike the times
on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import PreparedPrompt, SamplingParams
from cogvlm_ray.engine import Engine, EngineConfig
from cogvlm_ray.model import load_model
from cogvlm_ray.model.tiny import make_tiny_checkpoint

logger = logging.getLogger("decode_host_time")


def _engine(model, tokenizer, backend: str, max_num_seqs: int) -> Engine:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    extra = {"attention_backend": backend} if "attention_backend" in names else {}
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(max_num_seqs=max_num_seqs, max_kv_tokens=65536, block_size=16, **extra),
    )
    if not extra:  # code from before `EngineConfig.attention_backend`
        model.set_attention_backend(backend)
    return engine


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.num_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.num_ops += 1
        return func(*args, **(kwargs or {}))


def measure(model, tokenizer, backend: str, batch: int, steps: int, prompt_tokens: int) -> dict:
    """Median wall / CPU ms of `runner.execute` over `steps` decode steps at `batch` sequences."""
    engine = _engine(model, tokenizer, backend, max(batch, 1))
    vocab = model.model_config.vocab_size
    for i in range(batch):
        ids = [1 + (7 * i + 13 * j) % (vocab - 300) for j in range(prompt_tokens)]
        prompt = PreparedPrompt(ids, [0] * len(ids), None, None)
        engine.add_request(
            prompt, SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True), f"r{i}"
        )
    wall, cpu = [], []
    num_ops = 0
    while len(wall) < steps + 1:
        out = engine.scheduler.schedule()
        is_decode = out.num_prefill_tokens == 0
        if is_decode and len(wall) == steps:  # one more decode step, counting its aten ops
            with _OpCounter() as counter:
                list(engine.scheduler.update_from_output(out, engine.runner.execute(out)))
            num_ops = counter.num_ops
            break
        t0, c0 = time.perf_counter(), time.thread_time()
        result = engine.runner.execute(out)
        t1, c1 = time.perf_counter(), time.thread_time()
        list(engine.scheduler.update_from_output(out, result))
        if is_decode:
            wall.append((t1 - t0) * 1e3)
            cpu.append((c1 - c0) * 1e3)
    engine._executor.shutdown(wait=True)
    return {
        "backend": backend,
        "batch": batch,
        "steps": steps,
        "wall_ms_median": round(statistics.median(wall), 3),
        "cpu_ms_median": round(statistics.median(cpu), 3),
        "cpu_ms_min": round(min(cpu), 3),
        "aten_ops_per_step": num_ops,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", preset="tiny", num_hidden_layers=args.layers)
        model = load_model(ckpt, dtype=torch.float32)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        measure(model, tokenizer, args.backend, batch, 5, args.prompt_tokens)  # warm-up
        row = measure(model, tokenizer, args.backend, batch, args.steps, args.prompt_tokens)
        logger.info("%s", row)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "results": results}, indent=2))


if __name__ == "__main__":
    main()
