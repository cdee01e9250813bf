"""Batch pipeline vs the HTTP server on the same images: images/s and output tokens/s, one run.

    python bench/batch_bench.py --model tiny-random:bench --num-images 200 --max-tokens 32 \\
        --concurrency 8,16,32 --output bench/results/batch_bench.json

Both paths run the model, engine and preprocessing settings of `serve_config.local.yaml` (its
`args:`; `--model` overrides the model), on CPU, each in a fresh local Ray cluster of its own:

* http: `serve run` of that config in a subprocess, driven by the load generator
  (`cogvlm_ray.loadgen`) in a closed loop at each `--concurrency` level after a warm-up; the
  best level is kept. Each request is one image as a JPEG data URL + the prompt, non-streaming
  (what an offline client would send).
* batch: `cogvlm_ray.batch` over a folder holding the same JPEG files, the same prompt, one
  engine actor (the app's one ModelServer replica) with the CPU preprocessing tasks beside it.
  Reported end to end (the job's wall time, including starting the actor and loading the model)
  and in steady state (from the first result written to the last, the comparison with a warm
  server).

Greedy, every request generates exactly `--max-tokens` tokens (`ignore_eos` + `min_tokens`), so
both paths do the same model work. The ratio batch / http is the headline (goal >= 1.3). CPU
milliseconds per image (every process of each path's Ray cluster; the HTTP client excluded) are
reported too: on a shared machine they move less with other jobs' load than wall-clock rates.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from full_stack import _wait_healthy, load_config  # bench/ is on sys.path: this script's folder

from cogvlm_ray.loadgen.report import format_summary, summarize
from cogvlm_ray.loadgen.runner import RunSettings, run_requests
from cogvlm_ray.loadgen.workload import BenchRequest, make_image_data_url
from cogvlm_ray.serve.ports import free_port

REPO = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.batch")

PROMPT = "Describe this image in detail."


class CpuMeter:
    """CPU seconds used by a process tree while it runs, short-lived processes included (polled
    every `interval_s`; a process is counted up to its last poll, so the figure is a slight
    underestimate for processes that live less than one interval)."""

    def __init__(self, root_pid: int, *, include_root: bool = True, interval_s: float = 0.25):
        import threading

        self.root_pid = root_pid
        self.include_root = include_root
        self.interval_s = interval_s
        self._baseline: dict[int, float] = {}
        self._latest: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_forever, daemon=True)

    def _poll(self, *, baseline: bool = False) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = (
                [root, *root.children(recursive=True)] if self.include_root else root.children(recursive=True)
            )
        except psutil.Error:
            return
        for proc in procs:
            try:
                used = sum(proc.cpu_times()[:2])
            except psutil.Error:
                continue
            if baseline:
                self._baseline[proc.pid] = used
            self._latest[proc.pid] = used

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def __enter__(self) -> CpuMeter:
        self._poll(baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def snapshot(self) -> float:
        """CPU seconds so far (polls now)."""
        self._poll()
        return self.seconds

    @property
    def seconds(self) -> float:
        return sum(used - self._baseline.get(pid, 0.0) for pid, used in self._latest.items())


def make_images(folder: Path, num_images: int, size: int, seed: int) -> list[Path]:
    """`num_images` distinct smooth random JPEGs (the load generator's pictures) as files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_images):
        url = make_image_data_url(size, seed=seed * 1_000_003 + 1000 + i)
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
        paths.append(path)
    return paths


def http_requests(paths: list[Path], model: str, max_tokens: int) -> list[BenchRequest]:
    out = []
    for i, path in enumerate(paths):
        url = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": False,
                "ignore_eos": True, "min_tokens": max_tokens,
                "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                          {"type": "image_url", "image_url": {"url": url}}]}]}  # fmt: skip
        out.append(BenchRequest(index=i, body=body, is_stream=False, has_image=True, is_repeated_image=False))
    return out


def run_http(
    config: dict, paths: list[Path], warmup: list[Path], args: argparse.Namespace, workdir: Path
) -> dict:
    port = config["http_options"]["port"]
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(workdir / "serve_run.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(["serve", "run", "--address", "local", str(config_path)], cwd=workdir, env=env,
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    levels: dict[str, Any] = {}
    try:
        _wait_healthy(base_url, process, timeout_s=args.startup_timeout)
        import httpx

        model = httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for concurrency in args.concurrency:
            settings = RunSettings(
                url=base_url + "/v1/chat/completions", concurrency=concurrency, timeout_s=600
            )
            asyncio.run(run_requests(http_requests(warmup, model, args.max_tokens), settings))
            with CpuMeter(process.pid) as cpu:  # the server side: serve run and its Ray cluster
                results = asyncio.run(run_requests(http_requests(paths, model, args.max_tokens), settings))
            summary = summarize(*results)
            sys.stdout.write(format_summary(f"http c={concurrency}", summary) + "\n")
            levels[str(concurrency)] = {
                "images_per_s": summary.num_ok / summary.duration_s,
                "output_tokens_per_s": summary.output_token_throughput,
                "num_ok": summary.num_ok,
                "duration_s": summary.duration_s,
                "server_cpu_ms_per_image": 1000 * cpu.seconds / max(summary.num_ok, 1),
            }
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    best = max(levels, key=lambda c: levels[c]["images_per_s"])
    return {"levels": levels, "best_concurrency": int(best), **levels[best]}


def run_batch(app_args: dict, folder: Path, args: argparse.Namespace, workdir: Path) -> dict:
    import ray

    from cogvlm_ray.api.chat import ChatDefaults
    from cogvlm_ray.batch.options import BatchOptions, InputSpec, PipelineSizing
    from cogvlm_ray.batch.pipeline import BatchSummary, build_dataset, open_writer
    from cogvlm_ray.serve.args import parse_args

    app = parse_args(app_args)
    options = BatchOptions(
        input=InputSpec(path=str(folder), prompt=PROMPT),
        output=str(workdir / "batch_out.jsonl"),
        app=app,
        defaults=ChatDefaults(max_tokens=args.max_tokens, temperature=0.0),
        request_fields={"ignore_eos": True, "min_tokens": args.max_tokens},
        sizing=PipelineSizing(batch_size=app.engine.max_num_seqs, max_concurrent_calls_per_actor=2),
    )
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        summary, arrivals = BatchSummary(), []
        start = time.perf_counter()
        writer = open_writer(options)
        with CpuMeter(os.getpid()) as cpu:  # the driver, the raylet, tasks and the engine actor
            for table in build_dataset(options).iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write(table)
                summary.add(table)
                arrivals.append((time.perf_counter(), table.num_rows, summary.num_output_tokens))
                if len(arrivals) == 1:
                    cpu_at_first = cpu.snapshot()
        writer.close()
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    (t_first, rows_first, tokens_first), (t_last, _, _) = arrivals[0], arrivals[-1]
    steady_s = t_last - t_first
    out = {
        "num_ok": summary.num_rows - summary.num_errors,
        "num_errors": summary.num_errors,
        "end_to_end_s": elapsed,
        "images_per_s_end_to_end": summary.num_rows / elapsed,
        "output_tokens_per_s_end_to_end": summary.num_output_tokens / elapsed,
        "first_result_after_s": t_first - start,
        "steady_state_s": steady_s,
        "images_per_s": (summary.num_rows - rows_first) / steady_s,
        "output_tokens_per_s": (summary.num_output_tokens - tokens_first) / steady_s,
        "cpu_ms_per_image_end_to_end": 1000 * cpu.seconds / max(summary.num_rows, 1),
        "cpu_ms_per_image": 1000 * (cpu.seconds - cpu_at_first) / max(summary.num_rows - rows_first, 1),
        "num_result_batches": len(arrivals),
    }
    sys.stdout.write(f"batch: {json.dumps({k: round(v, 2) for k, v in out.items()})}\n")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random:bench")
    p.add_argument("--config", default=str(REPO / "serve_config.local.yaml"))
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="8,16,32", help="HTTP levels (the best is kept)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="cogvlm-batch-bench-") as tmp:
        workdir = Path(tmp)
        paths = make_images(workdir / "images", args.num_images, args.image_size, seed=0)
        warmup = make_images(workdir / "warmup", args.warmup, args.image_size, seed=1)
        config = load_config(Path(args.config), args.model, free_port(), str(workdir / "prom"))
        app_args = {**config["applications"][0]["args"]}
        batch = run_batch(app_args, workdir / "images", args, workdir)
        http = run_http(config, paths, warmup, args, workdir)
    document = {
        "model": args.model,
        "num_images": args.num_images,
        "max_tokens": args.max_tokens,
        "engine_args": config["applications"][0]["args"]["engine"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "http": http,
        "batch": batch,
        "batch_over_http": {
            "images_per_s_steady": batch["images_per_s"] / http["images_per_s"],
            "images_per_s_end_to_end": batch["images_per_s_end_to_end"] / http["images_per_s"],
            "output_tokens_per_s_steady": batch["output_tokens_per_s"] / http["output_tokens_per_s"],
            "cpu_ms_per_image_http_over_batch": http["server_cpu_ms_per_image"] / batch["cpu_ms_per_image"],
        },
    }
    sys.stdout.write(
        f"batch / http: {json.dumps({k: round(v, 2) for k, v in document['batch_over_http'].items()})}\n"
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
