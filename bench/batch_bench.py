"""Batch pipeline vs the HTTP server on the same images: images/s and output tokens/s, one run.

    python bench/batch_bench.py --model tiny-random:bench --num-images 200 --max-tokens 32 \\
        --concurrency 8,16,32 --repeats 2 --output bench/results/batch_bench/demo_config.json

Both paths run the model, engine and preprocessing settings of `serve_config.local.yaml` (its
`args:`; `--model` and `--max-num-seqs` override them for both), on CPU, each in a fresh local
Ray cluster of its own, with the same number of engines (`--engines`: ModelServer replicas, and
batch engine actors reserving the ModelServer's CPUs):

* http: `serve run` of that config in a subprocess, driven by the load generator
  (`cogvlm_ray.loadgen`) in a closed loop after a warm-up on other images. Each `--concurrency`
  level gets a **fresh server**, so every level sees the images once (a second level on the same
  server would find them in its image-feature and prefix caches); the best level is kept. Each
  request is one image as a JPEG data URL + the prompt, non-streaming (what an offline client
  would send). Its clock: first request to last response, on a warm server.
* batch: `cogvlm_ray.batch` over a folder holding the same JPEG files, the same prompt. Reported
  **warm** (from the first engine actor being ready, stamped by its engine factory, to the last
  result written: like the HTTP clock, ramp-up and tail included), **end to end** (the whole job:
  starting the actors and loading the model too), and **cold** vs `serve run` start-up + the
  requests. ("steady", first result written to last, is kept in the JSON but over-counts: the
  rows in flight at the first result were partly done.)

`--repeats N` alternates batch, http, batch, http, ... so that a burst of other load on the
machine hits both; the best run of each path is kept and every run is listed.

Greedy, every request generates exactly `--max-tokens` tokens (`ignore_eos` + `min_tokens`), so
both paths do the same model work. The ratio batch / http is the headline (goal >= 1.3). CPU
milliseconds per image (every process of each path's Ray cluster, by role; the HTTP client
excluded) are reported too: on a shared machine they move less with other jobs' load than
wall-clock rates.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from full_stack import (  # bench/ is on sys.path: this script's folder
    _wait_healthy,
    load_config,
    replica_name,
    serve_run,
)

from cogvlm_ray.batch.options import PipelineSizing
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

    def __init__(
        self,
        root_pid: int,
        *,
        include_root: bool = True,
        interval_s: float = 0.25,
        mark_when: Path | None = None,
    ):
        import threading

        self.mark_when = mark_when
        """A file whose appearance is marked: `seconds_at_mark` is the CPU used up to then."""
        self.seconds_at_mark: float | None = None
        self.root_pid = root_pid
        self.include_root = include_root
        self.interval_s = interval_s
        self._baseline: dict[int, float] = {}
        self._latest: dict[int, float] = {}
        self._roles: dict[int, str] = {}
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
            if self._roles.get(proc.pid, "ray system + workers") == "ray system + workers":
                self._roles[proc.pid] = process_role(proc)  # a pooled worker takes its role later

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()
            if self.seconds_at_mark is None and self.mark_when is not None and self.mark_when.exists():
                self.seconds_at_mark = self.seconds

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

    def by_role(self) -> dict[str, float]:
        """CPU seconds per process role (replicas and Ray Data workers by name, the rest grouped)."""
        out: dict[str, float] = {}
        for pid, used in self._latest.items():
            role = self._roles.get(pid, "other")
            out[role] = out.get(role, 0.0) + used - self._baseline.get(pid, 0.0)
        return dict(sorted(out.items(), key=lambda item: -item[1]))


def process_role(proc: Any) -> str:
    """A short name for a process of a path's Ray cluster."""
    import psutil

    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "other"
    if "ServeReplica:" in title:  # "ray::ServeReplica:<app>:<deployment>"
        return "replica " + replica_name(title)
    if "ProxyActor" in title:
        return "serve proxy"
    if "MapWorker(" in title:  # "ray::MapWorker(MapBatches(EngineStage))"
        return "engine actor" if "EngineStage" in title else "ray data map worker"
    if "prepare_batch" in title or "ReadBinary" in title or "ReadParquet" in title:
        return "read + preprocessing tasks"  # pooled workers run both stages' tasks
    if "ray::" in title and "IDLE" not in title:
        return "ray: " + title.split("ray::", 1)[1].split()[0].split(".")[0]
    if proc.pid == os.getpid():
        return "driver (batch job)"
    return "ray system + workers"


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
    """Each concurrency level on a fresh server: the 200 images once each, as in the batch job
    (a second level on the same server would find them in its image-feature and prefix caches)."""
    levels = {str(c): http_level(config, c, paths, warmup, args, workdir) for c in args.concurrency}
    best = max(levels, key=lambda c: levels[c]["images_per_s"])
    return {"levels": levels, "best_concurrency": int(best), **levels[best]}


def http_level(
    config: dict,
    concurrency: int,
    paths: list[Path],
    warmup: list[Path],
    args: argparse.Namespace,
    workdir: Path,
) -> dict:
    started = time.perf_counter()
    with serve_run(config, workdir) as (process, base_url):
        _wait_healthy(base_url, process, timeout_s=args.startup_timeout)
        startup_s = time.perf_counter() - started  # `serve run` to a healthy app (1 s polls)
        import httpx

        model = httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        settings = RunSettings(url=base_url + "/v1/chat/completions", concurrency=concurrency, timeout_s=600)
        asyncio.run(run_requests(http_requests(warmup, model, args.max_tokens), settings))
        with CpuMeter(process.pid) as cpu:  # the server side: serve run and its Ray cluster
            results = asyncio.run(run_requests(http_requests(paths, model, args.max_tokens), settings))
    summary = summarize(*results)
    sys.stdout.write(format_summary(f"http c={concurrency}", summary) + "\n")
    return {
        "images_per_s": summary.num_ok / summary.duration_s,
        "output_tokens_per_s": summary.output_token_throughput,
        "num_ok": summary.num_ok,
        "duration_s": summary.duration_s,
        "startup_s": startup_s,
        "server_cpu_ms_per_image": 1000 * cpu.seconds / max(summary.num_ok, 1),
        "server_cpu_ms_per_image_by_role": {
            role: round(1000 * seconds / max(summary.num_ok, 1), 1) for role, seconds in cpu.by_role().items()
        },
    }


class ReadyStampingFactory:
    """The pipeline's engine factory, appending the wall time each engine is ready to `path` (the
    batch path's "warm" clock starts at the first one: a warm server has already paid this)."""

    def __init__(self, inner: Any, path: str):
        self.inner, self.path = inner, path

    def __call__(self) -> Any:
        engine = self.inner()
        with open(self.path, "a") as f:
            f.write(f"{time.time()}\n")
        return engine


def run_batch(
    app_args: dict, model_server_cpus: float, folder: Path, args: argparse.Namespace, workdir: Path
) -> dict:
    import ray

    from cogvlm_ray.api.chat import ChatDefaults
    from cogvlm_ray.batch.generation import EngineFactory
    from cogvlm_ray.batch.options import BatchOptions, InputSpec
    from cogvlm_ray.batch.pipeline import BatchSummary, build_dataset, open_writer
    from cogvlm_ray.serve.args import parse_args

    app = parse_args(app_args)
    options = BatchOptions(
        input=InputSpec(path=str(folder), prompt=PROMPT),
        output=str(workdir / "batch_out.jsonl"),
        app=app,
        defaults=ChatDefaults(max_tokens=args.max_tokens, temperature=0.0),
        request_fields={"ignore_eos": True, "min_tokens": args.max_tokens},
        sizing=PipelineSizing(
            min_actors=args.engines,
            max_actors=args.engines,
            num_cpus_per_actor=model_server_cpus,  # what a ModelServer replica reserves
            num_cpus_per_preprocess_task=args.preprocess_cpus,
            batch_size=app.engine.max_num_seqs,
            max_concurrent_calls_per_actor=2,
        ),
    )
    ready_file = workdir / "engine_ready"
    ready_file.unlink(missing_ok=True)
    summary, arrivals = BatchSummary(), []
    # The job's clock and CPU meter start before its Ray cluster does, as `serve run`'s start-up
    # includes its cluster: the driver, the raylet and GCS, tasks and the engine actors.
    start = time.perf_counter()
    with CpuMeter(os.getpid(), mark_when=ready_file) as cpu:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="warning")
        ray_init_s = time.perf_counter() - start
        try:
            writer = open_writer(options)
            factory = ReadyStampingFactory(EngineFactory(app), str(ready_file))
            dataset = build_dataset(options, engine_factory=factory)
            for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.write(table)
                summary.add(table)
                arrivals.append((time.perf_counter(), table.num_rows, summary.num_output_tokens))
                if len(arrivals) == 1:
                    cpu_at_first = cpu.snapshot()
            writer.close()
            elapsed = time.perf_counter() - start
            cpu.snapshot()  # while the cluster's processes still exist
        finally:
            ray.shutdown()
    (t_first, rows_first, tokens_first), (t_last, _, _) = arrivals[0], arrivals[-1]
    steady_s = t_last - t_first
    # perf_counter and time.time tick together within one run: the first engine's ready time on
    # the perf_counter clock.
    t_ready = min(float(line) for line in ready_file.read_text().split()) - (
        time.time() - time.perf_counter()
    )
    warm_s = t_last - t_ready
    out = {
        "num_ok": summary.num_rows - summary.num_errors,
        "num_errors": summary.num_errors,
        "end_to_end_s": elapsed,
        "ray_init_s": ray_init_s,
        "images_per_s_end_to_end": summary.num_rows / elapsed,
        "output_tokens_per_s_end_to_end": summary.num_output_tokens / elapsed,
        "first_result_after_s": t_first - start,
        "engine_ready_after_s": t_ready - start,
        "warm_s": warm_s,
        "images_per_s_warm": summary.num_rows / warm_s,
        "output_tokens_per_s_warm": summary.num_output_tokens / warm_s,
        "steady_state_s": steady_s,
        "images_per_s": (summary.num_rows - rows_first) / steady_s,
        "output_tokens_per_s": (summary.num_output_tokens - tokens_first) / steady_s,
        "cpu_ms_per_image_end_to_end": 1000 * cpu.seconds / max(summary.num_rows, 1),
        "cpu_ms_per_image": 1000 * (cpu.seconds - cpu_at_first) / max(summary.num_rows - rows_first, 1),
        "cpu_ms_per_image_warm": 1000
        * (cpu.seconds - (cpu.seconds_at_mark or 0.0))
        / max(summary.num_rows, 1),
        "num_result_batches": len(arrivals),
        "cpu_ms_per_image_end_to_end_by_role": {
            role: round(1000 * seconds / max(summary.num_rows, 1), 1)
            for role, seconds in cpu.by_role().items()
        },
    }
    sys.stdout.write(
        f"batch: {json.dumps({k: v if isinstance(v, dict) else round(v, 2) for k, v in out.items()})}\n"
    )
    return out


def override_engine(config: dict, max_num_seqs: int, max_concurrency: int) -> None:
    """Both paths with a bigger running batch: the engine's and the ingress's queues grow to
    match, so neither path refuses a request as overloaded (HTTP at `max_concurrency` clients,
    batch at 2 calls of `max_num_seqs` rows)."""
    app = config["applications"][0]["args"]
    queue = max(2 * max_num_seqs, max_concurrency)
    app["engine"] = {**app["engine"], "max_num_seqs": max_num_seqs, "max_waiting": queue}
    app["max_queued_requests"] = max(app.get("max_queued_requests", 0), queue)


def set_engines(config: dict, engines: int) -> float:
    """`engines` ModelServer replicas (the HTTP path's engine processes); returns the CPUs one
    reserves, which each batch engine actor reserves too."""
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    model_server = deployments["ModelServer"]
    model_server["num_replicas"] = engines
    return float(model_server.get("ray_actor_options", {}).get("num_cpus", 1.0))


def ratios(batch: dict, http: dict) -> dict[str, float]:
    return {
        # A warm server vs the job from its first engine being ready (both: ramp-up and tail in).
        "images_per_s_warm": batch["images_per_s_warm"] / http["images_per_s"],
        "output_tokens_per_s_warm": batch["output_tokens_per_s_warm"] / http["output_tokens_per_s"],
        # Both from nothing: `serve run` to healthy + the requests, vs the whole batch job.
        "images_per_s_cold": batch["images_per_s_end_to_end"]
        / (http["num_ok"] / (http["startup_s"] + http["duration_s"])),
        # The whole job (start-up in) vs a warm server.
        "images_per_s_end_to_end": batch["images_per_s_end_to_end"] / http["images_per_s"],
        # From the first result written (not a fair clock: work in flight at that moment is free).
        "images_per_s_steady": batch["images_per_s"] / http["images_per_s"],
        "cpu_ms_per_image_http_over_batch": http["server_cpu_ms_per_image"] / batch["cpu_ms_per_image_warm"],
    }


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
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="override the config's engine.max_num_seqs, for both paths (max_waiting follows)",
    )
    p.add_argument("--engines", type=int, default=1, help="ModelServer replicas = batch engine actors")
    p.add_argument("--preprocess-cpus", type=float, default=PipelineSizing.num_cpus_per_preprocess_task,
                   help="CPUs per preprocessing task (default: the CLI's)")  # fmt: skip
    p.add_argument(
        "--repeats", type=int, default=1, help="batch, http, batch, http, ...: the best of each is kept"
    )
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--batch-only", action="store_true", help="skip the HTTP path (trying batch settings)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()

    batches, https = [], []
    with tempfile.TemporaryDirectory(prefix="cogvlm-batch-bench-") as tmp:
        workdir = Path(tmp)
        paths = make_images(workdir / "images", args.num_images, args.image_size, seed=0)
        warmup = make_images(workdir / "warmup", args.warmup, args.image_size, seed=1)
        config = load_config(Path(args.config), args.model, free_port(), str(workdir / "prom"))
        if args.max_num_seqs:
            override_engine(config, args.max_num_seqs, max(args.concurrency))
        model_server_cpus = set_engines(config, args.engines)
        app_args = {**config["applications"][0]["args"]}
        for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits both
            batches.append(run_batch(app_args, model_server_cpus, workdir / "images", args, workdir))
            if not args.batch_only:
                https.append(run_http(config, paths, warmup, args, workdir))
    if args.batch_only:
        return 0
    batch = max(batches, key=lambda run: run["images_per_s_warm"])
    http = max(https, key=lambda run: run["images_per_s"])
    document = {
        "model": args.model,
        "num_images": args.num_images,
        "max_tokens": args.max_tokens,
        "engines": args.engines,
        "engine_args": config["applications"][0]["args"]["engine"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "http": http,
        "batch": batch,
        "batch_over_http": ratios(batch, http),
        "repeats": {
            "http_images_per_s": [run["images_per_s"] for run in https],
            "batch_images_per_s_warm": [run["images_per_s_warm"] for run in batches],
            "batch_images_per_s_end_to_end": [run["images_per_s_end_to_end"] for run in batches],
            "batch_over_http_warm_pairwise": [
                b["images_per_s_warm"] / h["images_per_s"] for b, h in zip(batches, https, strict=True)
            ],
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
