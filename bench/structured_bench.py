"""Structured-output cost per step: a batch of 32 with a quarter constrained vs the same batch free.

    python bench/structured_bench.py [--preset bench] [--batch 32] [--constrained 8]
                                     [--steps 24] [--rounds 5] [--threads 1] [--json out.json]

One process, a random CogVLM2 checkpoint (`make_tiny_checkpoint(preset=...)`; "bench": LM hidden
512, 8 layers, vocab 4096) in float32 on CPU, text-only prompts. Both batches hold `--batch`
decoding requests sampled at temperature 1 with ignore_eos, so every step decodes exactly
`--batch` tokens; in the constrained batch `--constrained` of them carry a JSON schema whose
string field needs 1000 characters (so they stay constrained, inside the string, for the run). The
two batches are measured in alternating rounds in the same process; each round times `--steps`
decode steps of `Engine.step()` (forward, bitmask fill + apply, sampling, matcher advance,
detokenization) after the prefill. Reported: median CPU ms per step of this process (all
threads) and wall ms, tokens/s, and the constrained / unconstrained ratio. On a shared machine
whole-step times move by several percent between rounds, so the grammar work itself (bitmask
fill in the runner, the sampler's bitmask op, matcher advance in the engine) is also timed directly with
per-thread CPU clocks, and its share of the unconstrained step is reported.
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

import torch
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import PreparedPrompt, SamplingParams, StructuredOutputSpec
from cogvlm_ray.engine import Engine, EngineConfig
from cogvlm_ray.engine import sampler as sampler_module
from cogvlm_ray.model import load_model
from cogvlm_ray.model.tiny import make_tiny_checkpoint

logger = logging.getLogger("structured_bench")

SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 1000}, "n": {"type": "integer"}},
    "required": ["text", "n"],
}


class GrammarTimer:
    """Wraps the three grammar call sites of a step (bitmask fill in the runner, the sampler's
    bitmask op, the matcher advance in the engine) and sums their per-thread CPU time."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = 0.0
        engine.runner.grammar_bitmask.fill = self._timed(engine.runner.grammar_bitmask.fill)
        sampler_module.apply_token_bitmask = self._timed(sampler_module.apply_token_bitmask)
        engine._advance_grammar = self._timed(engine._advance_grammar)

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        return wrapper


async def time_batch(
    engine: Engine, prompts: list[PreparedPrompt], num_constrained: int, steps: int, tag: str
):
    """(cpu ms, wall ms, grammar cpu ms) per step over `steps` decode steps of one fresh batch."""
    spec = StructuredOutputSpec("json_schema", json.dumps(SCHEMA))
    streams = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            max_tokens=steps + 4,
            temperature=1.0,
            seed=i,
            ignore_eos=True,
            structured=spec if i < num_constrained else None,
        )
        streams.append(engine.add_request(prompt, params, f"{tag}-{i}"))
    if engine._compile_tasks:
        await asyncio.gather(*engine._compile_tasks)
    while engine.scheduler.num_waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        await engine.step()  # admission + prefill, not timed
    await engine.step()  # first decode (warms the matchers), not timed
    timer: GrammarTimer = engine._bench_timer  # type: ignore[attr-defined]
    cpu_start, wall_start, grammar_start = time.process_time(), time.perf_counter(), timer.seconds
    for _ in range(steps):
        await engine.step()
        assert engine.get_stats().batch_size == len(prompts), "a request left the batch early"
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    grammar = timer.seconds - grammar_start
    for request_id in list(engine.scheduler.requests):
        engine.abort(request_id)
    engine._apply_aborts()
    for stream in streams:
        await stream.aclose()
    return 1000 * cpu / steps, 1000 * wall / steps, 1000 * grammar / steps


async def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_tiny_checkpoint(tmp, preset=args.preset)
        model = load_model(directory, dtype=torch.float32)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=args.batch, max_kv_tokens=1 << 16))
    engine._bench_timer = GrammarTimer(engine)  # type: ignore[attr-defined]
    words = [
        "Read",
        "the",
        "receipt",
        "and",
        "answer",
        "in",
        "JSON",
        "with",
        "the",
        "shop",
        "name",
        "and",
        "the",
        "total",
    ]
    prompts = [
        PreparedPrompt(ids, [0] * len(ids), None, None)
        for ids in (
            [
                model.model_config.bos_token_id,
                *tokenizer.encode(" ".join(words[: 6 + i % 8]), add_special_tokens=False),
            ]
            for i in range(args.batch)
        )
    ]
    results: dict[str, list[tuple[float, float, float]]] = {"unconstrained": [], "constrained": []}
    await time_batch(engine, prompts, args.constrained, 4, "warmup")  # compile + allocate once
    for round_ in range(args.rounds):
        for name, num in (("unconstrained", 0), ("constrained", args.constrained)):
            results[name].append(await time_batch(engine, prompts, num, args.steps, f"{name}{round_}"))
    await engine.shutdown()
    summary = {}
    for name, rows in results.items():
        cpu_ms = statistics.median(r[0] for r in rows)
        wall_ms = statistics.median(r[1] for r in rows)
        summary[name] = {
            "cpu_ms_per_step": round(cpu_ms, 2),
            "wall_ms_per_step": round(wall_ms, 2),
            "tokens_per_cpu_s": round(args.batch * 1000 / cpu_ms, 1),
            "tokens_per_s": round(args.batch * 1000 / wall_ms, 1),
            "grammar_cpu_ms_per_step": round(statistics.median(r[2] for r in rows), 3),
        }
    base, constrained = summary["unconstrained"], summary["constrained"]
    return {
        "machine": f"{platform.processor() or platform.machine()}, torch threads {args.threads}",
        "preset": args.preset,
        "batch": args.batch,
        "constrained_rows": args.constrained,
        "steps": args.steps,
        "rounds": args.rounds,
        **summary,
        "cpu_step_ratio": round(constrained["cpu_ms_per_step"] / base["cpu_ms_per_step"], 3),
        "wall_step_ratio": round(constrained["wall_ms_per_step"] / base["wall_ms_per_step"], 3),
        "grammar_share_of_step": round(constrained["grammar_cpu_ms_per_step"] / base["cpu_ms_per_step"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--constrained", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    logger.warning("%s", text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
