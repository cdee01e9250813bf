"""Sampler benchmark: the batched sampler vs the old row-by-row one, on the same logits (CPU).

    PYTHONPATH=. python bench/sampler_bench.py [--batch 32] [--vocab 128256] [--steps 20] [--prompt-len 2330]
                                               [--threads 2] [--json out.json]

A decode step's sampling alone, at batch 32 with the real vocabulary (128,256) on CPU, over
`--steps` consecutive steps (outputs grow, so the penalties see a changing history). The batch
mixes what production sees: a quarter plain greedy, a quarter greedy with a repetition penalty,
a quarter seeded temperature + top-p, a quarter seeded top-k + top-p + repetition penalty;
every prompt is `--prompt-len` tokens (an image prompt of the real model is ~2,330).

* old: `tests/unit/engine/sampler_reference.py` (the previous engine sampler: one row at a time,
  `sorted(set(prompt + output))` on the host for the penalty, one `.item()` per row).
* new: `cogvlm_ray.engine.sampler.Sampler` (whole-batch ops, device token counts, one copy).
  Also timed: the same batch with logprobs (top 5) on every row, and with OpenAI
  presence / frequency penalties on the penalised rows (no old equivalent).

Both samplers must return the same ids for the mixed batch (checked, seeded rows included).
The samplers run interleaved, step by step, so that the load of a shared machine hits them
alike. Reported per sampler: median wall ms per step, median and minimum CPU ms per step (CPU
time of this process; use --threads 1 on a loaded machine, where idle OpenMP threads spin),
the old/new ratios, and per step the number of aten ops (on a GPU, about the kernel launches)
and of host syncs (`.item()` and friends), counted under a TorchDispatchMode.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.engine.sampler import Sampler, SamplingRow, make_generator
from tests.unit.engine import sampler_reference as ref

logger = logging.getLogger("sampler_bench")

KINDS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.1),
    SamplingParams(temperature=0.8, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1),
]


def make_rows(batch: int, vocab: int, prompt_len: int, variant: str) -> list[SamplingRow]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(batch):
        params = KINDS[i * len(KINDS) // batch]
        if not params.is_greedy:
            params = replace(params, seed=1000 + i)
        if variant == "logprobs":
            params = replace(params, logprobs=True, top_logprobs=5)
        if variant == "openai_penalties" and params.repetition_penalty != 1.0:
            params = replace(params, presence_penalty=0.5, frequency_penalty=0.5)
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        rows.append(SamplingRow(f"r{i}", params, prompt, [], (vocab - 1,)))
    return rows


class NewStepper:
    def __init__(self, rows: list[SamplingRow], vocab: int) -> None:
        self.rows = rows
        self.sampler = Sampler(vocab, max_num_seqs=len(rows))

    def step(self, x: torch.Tensor) -> list[int]:
        ids = self.sampler.sample(x, self.rows).token_ids
        for r, t in zip(self.rows, ids, strict=True):
            r.output_token_ids.append(t)
        return ids


class OldStepper:
    def __init__(self, rows: list[SamplingRow]) -> None:
        self.prompts = [r.prompt_token_ids for r in rows]
        self.outputs: list[list[int]] = [[] for _ in rows]
        self.rows = [
            ref.ReferenceRow(
                r.params,
                None if r.params.is_greedy else make_generator(r.params.seed, "cpu"),
                [],
                0,
                r.suppress_token_ids,
            )
            for r in rows
        ]

    def step(self, x: torch.Tensor) -> list[int]:
        for prompt, output, row in zip(self.prompts, self.outputs, self.rows, strict=True):
            row.token_ids = prompt + output  # what the old runner built every step
            row.num_output_tokens = len(output)
        ids = ref.sample(x, self.rows)
        for output, t in zip(self.outputs, ids, strict=True):
            output.append(t)
        return ids


class OpCounter(TorchDispatchMode):
    """Counts aten ops (on a GPU, roughly the kernel launches) and host syncs of one step."""

    SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.item")

    def __init__(self) -> None:
        super().__init__()
        self.num_ops = 0
        self.num_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.num_ops += 1
        self.num_syncs += any(str(func).startswith(name) for name in self.SYNC_OPS)
        return func(*args, **(kwargs or {}))


def count_ops(step, x: torch.Tensor) -> dict[str, int]:
    with OpCounter() as counter:
        step(x)
    return {"aten_ops": counter.num_ops, "host_syncs": counter.num_syncs}


def timed(step, x: torch.Tensor) -> tuple[list[int], float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    ids = step(x)
    return ids, 1e3 * (time.perf_counter() - wall), 1e3 * (time.process_time() - cpu)


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return {
        "wall_median": statistics.median(walls),
        "cpu_median": statistics.median(cpus),
        "cpu_min": min(cpus),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=2330)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(args.batch, args.vocab, generator=gen) * 4 for _ in range(args.steps + 1)]

    steppers = {
        "old": OldStepper(make_rows(args.batch, args.vocab, args.prompt_len, "mixed")),
        "new": NewStepper(make_rows(args.batch, args.vocab, args.prompt_len, "mixed"), args.vocab),
        "new_logprobs": NewStepper(
            make_rows(args.batch, args.vocab, args.prompt_len, "logprobs"), args.vocab
        ),
        "new_openai_penalties": NewStepper(
            make_rows(args.batch, args.vocab, args.prompt_len, "openai_penalties"), args.vocab
        ),
    }
    for stepper in steppers.values():  # warm-up: fills the new sampler's count rows, as a first step does
        stepper.step(logits[0])
    # Interleaved step by step, so that the load of this shared machine hits all alike.
    ids: dict[str, list[list[int]]] = {name: [] for name in steppers}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    for x in logits[1:]:
        for name, stepper in steppers.items():
            step_ids, wall_ms, cpu_ms = timed(stepper.step, x)
            ids[name].append(step_ids)
            samples[name].append((wall_ms, cpu_ms))
    identical = ids["old"] == ids["new"]  # seeded rows included: same draws in the same order
    ops = {name: count_ops(stepper.step, logits[-1]) for name, stepper in steppers.items()}
    results: dict[str, object] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "config": vars(args) | {"json": str(args.json) if args.json else None},
        "identical_ids": identical,
        "ms_per_step": {name: summary(s) for name, s in samples.items()},
        "per_step_counts": ops,
    }
    old, new = summary(samples["old"]), summary(samples["new"])
    results["ratio_old_over_new"] = {
        "cpu_median": old["cpu_median"] / new["cpu_median"],
        "cpu_min": old["cpu_min"] / new["cpu_min"],
        "wall_median": old["wall_median"] / new["wall_median"],
    }
    logger.info(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not identical:
        raise SystemExit("the two samplers disagree")


if __name__ == "__main__":
    main()
