"""Command line: `python -m cogvlm_ray.loadgen [options]`; see docs/benchmarks-howto.md.

One "level" per value of `--concurrency` (closed loop) or `--request-rate` (Poisson,
with `--max-concurrency` as an optional cap). Each level sends the same `--num-requests`
synthetic requests after `--warmup` uncounted ones. Results: a JSON file (`--output`),
an optional PNG chart (`--chart`), a summary on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
from typing import TextIO

import httpx

from cogvlm_ray.loadgen.client import RequestResult
from cogvlm_ray.loadgen.report import format_summary, summarize
from cogvlm_ray.loadgen.runner import Progress, RunSettings, run_requests
from cogvlm_ray.loadgen.workload import WorkloadSpec, build_requests

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers >= 1")
    return values


def _float_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive numbers")
    return values


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("expected a fraction in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cogvlm_ray.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--endpoint", default="/v1/chat/completions")
    p.add_argument("--model", default=None, help="model name; default: the first of GET /v1/models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=_int_list, default=[1], help="e.g. 1,8,32 (closed loop)")
    load.add_argument("--request-rate", type=_float_list, default=None, help="Poisson req/s, e.g. 1,2,4")
    load.add_argument("--max-concurrency", type=int, default=None, help="in-flight cap with --request-rate")
    load.add_argument("--num-requests", type=int, default=64, help="counted requests per level")
    load.add_argument("--warmup", type=int, default=2, help="uncounted requests before each level")
    load.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    work = p.add_argument_group("workload")
    work.add_argument("--image-size", type=int, default=224, help="generated image side in pixels")
    work.add_argument("--image-share", type=_share, default=1.0, help="fraction of requests with an image")
    work.add_argument(
        "--repeat-image-share", type=_share, default=0.0, help="fraction of image requests reusing one image"
    )
    work.add_argument("--prompt-tokens", type=int, default=32, help="approximate text tokens per prompt")
    work.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    work.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos/min_tokens (servers that reject extra fields)",
    )
    work.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming requests")
    work.add_argument("--stream-share", type=_share, default=None, help="mix: fraction of streaming requests")
    work.add_argument("--temperature", type=float, default=0.0)
    work.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--output", default=None, help="write the results JSON here")
    out.add_argument("--chart", default=None, help="write a PNG chart here (needs matplotlib)")
    out.add_argument("--save-requests", action="store_true", help="include per-request records in the JSON")
    out.add_argument("--label", default="", help="free text stored in the JSON and the chart title")
    return p


def discover_model(base_url: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def run_sweep(args: argparse.Namespace, stderr: TextIO | None = None) -> dict:
    """Run every level and return the JSON-ready result document."""
    model = args.model or discover_model(args.base_url, args.api_key)
    spec = WorkloadSpec(
        model=model,
        image_size=args.image_size,
        image_share=args.image_share,
        repeat_image_share=args.repeat_image_share,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        stream=args.stream,
        stream_share=args.stream_share,
        temperature=args.temperature,
        seed=args.seed,
    )
    requests = build_requests(spec, args.num_requests)
    warmup = build_requests(dataclasses.replace(spec, seed=spec.seed + 99_991), args.warmup)
    url = args.base_url.rstrip("/") + args.endpoint
    if args.request_rate:
        levels = [(args.max_concurrency, rate) for rate in args.request_rate]
    else:
        levels = [(c, None) for c in args.concurrency]

    runs = []
    for concurrency, rate in levels:
        label = f"rate={rate}" if rate is not None else f"c={concurrency}"
        settings = RunSettings(
            url=url,
            concurrency=concurrency,
            request_rate=rate,
            timeout_s=args.timeout,
            api_key=args.api_key,
            seed=args.seed,
        )
        if warmup:  # closed loop, uncounted
            warm_settings = dataclasses.replace(settings, concurrency=concurrency or 1, request_rate=None)
            asyncio.run(run_requests(warmup, warm_settings))
        progress = Progress(label, len(requests), stream=stderr)
        results, duration = asyncio.run(run_requests(requests, settings, progress))
        summary = summarize(results, duration)
        sys.stdout.write(format_summary(label, summary) + "\n")
        run: dict = {"concurrency": concurrency, "request_rate": rate, "summary": summary.to_dict()}
        if args.save_requests:
            run["requests"] = [_record(r) for r in results]
        runs.append(run)
    return {
        "label": args.label,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "url": url,
        "workload": dataclasses.asdict(spec),
        "num_requests_per_level": args.num_requests,
        "warmup_per_level": args.warmup,
        "client_machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "runs": runs,
    }


def _record(r: RequestResult) -> dict:
    return {
        "index": r.index,
        "status": r.status,
        "is_stream": r.is_stream,
        "has_image": r.has_image,
        "e2e_s": r.e2e_s,
        "ttft_s": r.ttft_s,
        "num_output_tokens": r.num_output_tokens,
        "num_prompt_tokens": r.num_prompt_tokens,
        "finish_reason": r.finish_reason,
        "error": r.error,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    args = build_parser().parse_args(argv)
    if args.num_requests < 1 or args.warmup < 0:
        raise SystemExit("--num-requests must be >= 1 and --warmup >= 0")
    document = run_sweep(args)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
        logger.info("wrote %s", args.output)
    if args.chart:
        from cogvlm_ray.loadgen.chart import write_chart

        write_chart(document["runs"], args.chart, title=args.label or document["url"])
        logger.info("wrote %s", args.chart)
    return 0
