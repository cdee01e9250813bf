"""`python -m cogvlm_ray.batch INPUT --output OUT [options]`: one batch job from the command line.

Connects to the Ray cluster named by `RAY_ADDRESS` (a RayJob sets it), or starts a local one,
runs the pipeline with Ray Data's progress bars on stderr, and prints a one-line summary.
Model flags mirror the Serve config's `args:` (or read them from one with `--serve-config`),
so a batch job runs the very model and engine settings the server runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from cogvlm_ray.api.chat import ChatDefaults
from cogvlm_ray.batch.options import BatchOptions, InputSpec, PipelineSizing
from cogvlm_ray.serve.args import AppArgs, parse_args

logger = logging.getLogger("cogvlm_ray.batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cogvlm_ray.batch", description=__doc__.split("\n")[0])
    p.add_argument("input", help="image folder or glob, OpenAI Batch .jsonl, or .parquet/.csv table")
    p.add_argument("--output", "-o", required=True, help=".jsonl file, or .parquet folder of part files")
    p.add_argument("--input-format", choices=["auto", "images", "openai", "table"], default="auto")
    p.add_argument("--output-format", choices=["auto", "jsonl", "parquet"], default="auto")
    p.add_argument("--prompt", default="Describe this image.",
                   help="prompt for images/tables; {path} {name} {stem} and table columns are filled in")  # fmt: skip
    p.add_argument("--image-column", default="image")
    p.add_argument("--prompt-column", default=None)
    p.add_argument("--id-column", default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--no-resume", action="store_true", help="overwrite OUT instead of skipping answered ids")
    p.add_argument("--include-token-ids", action="store_true")

    m = p.add_argument_group("model (as in the Serve config's args:)")
    m.add_argument("--serve-config", default=None, help="take model/engine args from this Serve config")
    m.add_argument("--model", default=None, help='hub id, checkpoint folder, or "tiny-random[:preset]"')
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    m.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None)
    m.add_argument("--quantization", default=None)
    m.add_argument("--cache-dir", default=None)
    m.add_argument("--max-num-seqs", type=int, default=None, help="engine running batch per actor")
    m.add_argument("--max-num-batched-tokens", type=int, default=None)
    m.add_argument("--max-kv-tokens", type=int, default=None)

    s = p.add_argument_group("sampling (defaults for rows that do not say)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--template-version", choices=["base", "chat", "vqa"], default=None)

    r = p.add_argument_group("Ray Data sizing")
    r.add_argument("--concurrency", default="1", help="engine actors: N, or MIN,MAX to autoscale")
    r.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs per engine actor (default: 1 on cuda, else 0)"
    )
    r.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per engine actor")
    r.add_argument(
        "--batch-size", type=int, default=None, help="rows per engine call (default: max_num_seqs)"
    )
    r.add_argument("--max-concurrent-calls", type=int, default=2, help="overlapping engine calls per actor")
    r.add_argument("--preprocess-batch-size", type=int, default=16)
    r.add_argument("--max-retries", type=int, default=3, help="engine actor restarts / call retries")
    return p


def app_args_from(ns: argparse.Namespace) -> AppArgs:
    raw: dict[str, Any] = {}
    if ns.serve_config:
        config = yaml.safe_load(Path(ns.serve_config).read_text())
        raw = dict(config["applications"][0].get("args") or {})
    for flag in ("model", "dtype", "device", "quantization", "cache_dir"):
        if getattr(ns, flag) is not None:
            raw[flag] = getattr(ns, flag)
    engine = dict(raw.get("engine") or {})
    for flag in ("max_num_seqs", "max_num_batched_tokens", "max_kv_tokens"):
        if getattr(ns, flag) is not None:
            engine[flag] = getattr(ns, flag)
    raw["engine"] = engine
    return parse_args(raw)


def options_from(ns: argparse.Namespace) -> BatchOptions:
    app = app_args_from(ns)
    low, _, high = ns.concurrency.partition(",")
    min_actors, max_actors = int(low), int(high or low)
    if not 1 <= min_actors <= max_actors:
        raise ValueError(f"--concurrency must be N or MIN,MAX with 1 <= MIN <= MAX, got {ns.concurrency!r}")
    num_gpus = ns.num_gpus if ns.num_gpus is not None else (1.0 if app.device == "cuda" else 0.0)
    sizing = PipelineSizing(
        min_actors=min_actors, max_actors=max_actors, num_gpus_per_actor=num_gpus,
        num_cpus_per_actor=ns.num_cpus, batch_size=ns.batch_size or app.engine.max_num_seqs,
        max_concurrent_calls_per_actor=ns.max_concurrent_calls, preprocess_batch_size=ns.preprocess_batch_size,
        max_retries=ns.max_retries,
    )  # fmt: skip
    request_fields: dict[str, Any] = {}
    if ns.seed is not None:
        request_fields["seed"] = ns.seed
    if ns.stop:
        request_fields["stop"] = ns.stop
    if ns.template_version:
        request_fields["template_version"] = ns.template_version
    spec = InputSpec(
        path=ns.input, format=ns.input_format, prompt=ns.prompt, image_column=ns.image_column,
        prompt_column=ns.prompt_column, id_column=ns.id_column, limit=ns.limit,
    )  # fmt: skip
    defaults = ChatDefaults(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                            top_k=ns.top_k, repetition_penalty=ns.repetition_penalty)  # fmt: skip
    return BatchOptions(input=spec, output=ns.output, output_format=ns.output_format, app=app,
                        defaults=defaults, request_fields=request_fields, sizing=sizing,
                        resume=not ns.no_resume, include_token_ids=ns.include_token_ids)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        options = options_from(ns)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    import ray

    from cogvlm_ray.batch.pipeline import run

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (a cluster, e.g. in a RayJob) when set, else a local cluster
    summary = run(options)
    sys.stdout.write(json.dumps({"output": options.output, "rows": summary.num_rows, "errors": summary.num_errors,
                                 "skipped_ids": summary.num_skipped, "output_tokens": summary.num_output_tokens,
                                 "seconds": round(summary.elapsed_s, 2)}) + "\n")  # fmt: skip
    return 0
