"""Full stack vs in-process engine: one workload through Ray Serve + HTTP and straight into the engine.

    python bench/full_stack.py --model tiny-random --concurrency 1,8 --num-requests 64 \\
        --output-dir bench/results/full_stack_tiny

* engine: in this process, no Ray, no HTTP. Each request goes through the API's own conversions
  (`ChatCompletionRequest` -> messages + `SamplingParams`), `Preprocessor.prepare` in a worker
  thread (as the Preprocessor replica runs it) and `Engine.add_request`; closed loop at each
  concurrency. torch uses 1 thread, as in the replica (Ray sets OMP_NUM_THREADS=1 for
  num_cpus <= 1).
* http: `serve run` of `serve_config.local.yaml` (model, port and metrics dir overridden) in a
  subprocess with its own local Ray cluster, driven by the load generator (`cogvlm_ray.loadgen`)
  with the same request bodies.

Both send byte-identical synthetic requests (`cogvlm_ray.loadgen.workload`, same seed). Each level
runs `--repeats` times per path and keeps the run with the best throughput (the least disturbed on
a shared machine). The report gives output tokens/s for each and `http / engine` at each
concurrency (goal >= 0.85), the CPU milliseconds each process spends per output token (where the
serving overhead goes), the image-cache effect over HTTP (TTFT, new vs repeated image), and writes
the HTTP sweep as JSON + PNG chart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

from cogvlm_ray.loadgen.chart import write_chart
from cogvlm_ray.loadgen.client import RequestResult
from cogvlm_ray.loadgen.report import RunSummary, format_summary, summarize
from cogvlm_ray.loadgen.runner import RunSettings, run_requests
from cogvlm_ray.loadgen.workload import BenchRequest, WorkloadSpec, build_requests
from cogvlm_ray.serve.ports import free_port

REPO = Path(__file__).resolve().parent.parent

logger = logging.getLogger("bench.full_stack")


def load_config(path: Path, model: str, port: int, metrics_dir: str) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update({"model": model, "metrics_dir": metrics_dir, "playground": False})
    return config


def best(runs: list[tuple[RunSummary, dict[str, float]]]) -> tuple[RunSummary, dict[str, float]]:
    """The repeat with the highest output throughput (the least disturbed by other load on the machine)."""
    return max(runs, key=lambda run: run[0].output_token_throughput)


def replica_name(title: str) -> str:
    """The deployment of a replica's process title "ray::ServeReplica:<app>:<deployment>[.<method>]"."""
    return title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]


def cpu_seconds(root_pid: int | None) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds used so far) for this process and every descendant of `root_pid`.

    Roles: Ray replicas by deployment name, the proxy and controller, the other Ray processes."""
    import psutil

    me = psutil.Process()
    out = {me.pid: ("load generator / in-process engine", sum(me.cpu_times()[:2]))}
    if root_pid is None:
        return out
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline()) or proc.name()
            used = sum(proc.cpu_times()[:2])
        except psutil.Error:
            continue
        if "ServeReplica:" in title:
            label = replica_name(title)
        elif "ProxyActor" in title or "ServeController" in title:
            label = "ProxyActor" if "ProxyActor" in title else "ServeController"
        else:
            label = "ray system + serve run"
        out[proc.pid] = (label, used)
    return out


def cpu_ms_per_token(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], summary: RunSummary
) -> dict[str, float]:
    """CPU milliseconds per output token, per role, between two `cpu_seconds` snapshots."""
    tokens = max(summary.total_output_tokens, 1)
    out: dict[str, float] = {}
    for pid, (label, used) in after.items():
        out[label] = out.get(label, 0.0) + used - before.get(pid, (label, 0.0))[1]
    return {label: round(1000 * seconds / tokens, 3) for label, seconds in out.items()}


# ---- in-process engine ----------------------------------------------------------------------
async def engine_level(engine: Any, preprocessor: Any, requests: list[BenchRequest], concurrency: int):
    from cogvlm_ray.api.chat import ChatDefaults, to_conversation, to_sampling_params
    from cogvlm_ray.api.protocol import ChatCompletionRequest

    queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    results: list[RequestResult] = []

    async def one(request: BenchRequest) -> RequestResult:
        result = RequestResult(request.index, "200", True, request.has_image, time.perf_counter())
        parsed = ChatCompletionRequest.model_validate(request.body)
        params = to_sampling_params(parsed, ChatDefaults())
        prepared = await asyncio.to_thread(
            preprocessor.prepare, to_conversation(parsed), max_tokens=params.max_tokens,
            template_version=parsed.template_version,
        )  # fmt: skip
        last = None
        async for output in engine.add_request(prepared, params, f"bench-{request.index}-{result.start}"):
            now = time.perf_counter()
            if output.new_token_ids:
                if last is None:
                    result.ttft_s = now - result.start
                else:
                    result.itl_s.append(now - last)
                last = now
            result.num_output_tokens = output.num_generated_tokens
            result.num_prompt_tokens = output.num_prompt_tokens
            result.finish_reason = output.finish_reason
        result.e2e_s = time.perf_counter() - result.start
        return result

    async def worker() -> None:
        while not queue.empty():
            results.append(await one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def run_engine(args: argparse.Namespace, config: dict, spec: WorkloadSpec) -> dict[str, dict]:
    import torch

    from cogvlm_ray.serve.app import parse_args
    from cogvlm_ray.serve.factories import load_engine, make_preprocessor
    from cogvlm_ray.serve.model_source import resolve_model_path

    torch.set_num_threads(args.engine_threads)
    app_args = parse_args(config["applications"][0]["args"])
    model_dir = resolve_model_path(app_args.model, os.path.expanduser(app_args.cache_dir))
    preprocessor = make_preprocessor(app_args, model_dir)
    out: dict[str, dict] = {}

    async def all_levels() -> None:
        engine = load_engine(app_args, model_dir)
        await engine.start()
        try:
            for concurrency in args.concurrency:
                warm = build_requests(replace(spec, seed=spec.seed + 1), args.warmup)
                await engine_level(engine, preprocessor, warm, concurrency)
                runs = []
                for _ in range(args.repeats):
                    requests = build_requests(spec, args.num_requests)
                    before = cpu_seconds(None)
                    summary = summarize(*await engine_level(engine, preprocessor, requests, concurrency))
                    runs.append((summary, cpu_ms_per_token(before, cpu_seconds(None), summary)))
                summary, cpu = best(runs)
                sys.stdout.write(
                    format_summary(f"engine c={concurrency}", summary) + f"\n   CPU ms/token {cpu}\n"
                )
                out[str(concurrency)] = {**summary.to_dict(), "cpu_ms_per_output_token": cpu}
        finally:
            await engine.shutdown(timeout_s=5.0)

    asyncio.run(all_levels())
    return out


# ---- Ray Serve + HTTP -----------------------------------------------------------------------
def run_http(
    args: argparse.Namespace, config: dict, spec: WorkloadSpec, workdir: Path
) -> tuple[list[dict], dict]:
    """The sweep's runs (load-generator JSON layout) and the image-cache TTFT check."""
    runs: list[dict] = []
    image_cache: dict = {}
    with serve_run(config, workdir) as (process, base_url):
        try:
            _wait_healthy(base_url, process, timeout_s=args.startup_timeout)
        except RuntimeError:
            tail = (workdir / "serve_run.log").read_text(errors="replace").splitlines()[-40:]
            logger.error("serve run did not come up; last lines of its log:\n%s", "\n".join(tail))
            raise
        model = httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        spec = replace(spec, model=model)
        for concurrency in args.concurrency:
            settings = RunSettings(
                url=base_url + "/v1/chat/completions", concurrency=concurrency, timeout_s=300
            )
            warm = build_requests(replace(spec, seed=spec.seed + 1), args.warmup)
            asyncio.run(run_requests(warm, settings))
            measured = []
            for _ in range(args.repeats):
                before = cpu_seconds(process.pid)
                summary = summarize(
                    *asyncio.run(run_requests(build_requests(spec, args.num_requests), settings))
                )
                measured.append((summary, cpu_ms_per_token(before, cpu_seconds(process.pid), summary)))
            summary, cpu = best(measured)
            sys.stdout.write(format_summary(f"http c={concurrency}", summary) + f"\n   CPU ms/token {cpu}\n")
            runs.append({"concurrency": concurrency, "request_rate": None, "summary": summary.to_dict(),
                         "cpu_ms_per_output_token": cpu})  # fmt: skip
        if args.image_cache_requests:
            image_cache = image_cache_effect(base_url, spec, args.image_cache_requests)
    return runs, image_cache


def image_cache_effect(base_url: str, spec: WorkloadSpec, num_requests: int) -> dict:
    """TTFT at concurrency 1: every request a new image vs every request the same image."""
    settings = RunSettings(url=base_url + "/v1/chat/completions", concurrency=1, timeout_s=300)
    ttft = {}
    for name, share in (("new_image", 0.0), ("repeated_image", 1.0)):
        cache_spec = replace(
            spec, image_share=1.0, repeat_image_share=share, max_tokens=2, seed=spec.seed + 7
        )
        results, duration = asyncio.run(run_requests(build_requests(cache_spec, num_requests), settings))
        ttft[name] = summarize(results, duration).ttft_ms.p50
    sys.stdout.write(f"image cache, TTFT p50 ms at c=1: {ttft}\n")
    return {"requests_per_arm": num_requests, "ttft_p50_ms": ttft}


@contextlib.contextmanager
def serve_run(config: dict, workdir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`serve run` of `config` in a subprocess (log appended to workdir/serve_run.log), yielding
    the process and its base URL; stopped with SIGINT (it tears down the cluster it started)."""
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(workdir / "serve_run.log", "a") as log:
        # `--address local`: always a fresh cluster of our own, never another one on this machine.
        process = subprocess.Popen(["serve", "run", "--address", "local", str(config_path)], cwd=workdir,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            yield process, f"http://127.0.0.1:{config['http_options']['port']}"
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_healthy(base_url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited with {process.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the app was not healthy within {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random", help='"tiny-random" or "tiny-random:bench"')
    p.add_argument("--config", default=str(REPO / "serve_config.local.yaml"))
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="runs per level and path; the best is kept")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--image-share", type=float, default=0.5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--image-cache-requests", type=int, default=16, help="per arm of the image-cache check (0: skip)"
    )
    p.add_argument("--engine-threads", type=int, default=1, help="torch threads in-process (replica: 1)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--output-dir", default=None, help="write full_stack.json and full_stack.png here")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    spec = WorkloadSpec(image_size=args.image_size, image_share=args.image_share, prompt_tokens=args.prompt_tokens,
                        max_tokens=args.max_tokens, ignore_eos=True, stream=True, temperature=0.0, seed=0)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="cogvlm-full-stack-") as tmp:
        workdir = Path(tmp)
        config = load_config(Path(args.config), args.model, free_port(), str(workdir / "prom"))
        document: dict[str, Any] = {
            "model": args.model,
            "workload": asdict(spec),
            "num_requests_per_level": args.num_requests,
            "repeats_per_level": args.repeats,
            "engine_args": config["applications"][0]["args"]["engine"],
            "machine": {"cpu_count": os.cpu_count(), "platform": sys.platform},
        }
        if not args.skip_engine:
            document["engine"] = run_engine(args, config, spec)
        if not args.skip_http:
            document["http"], document["http_image_cache"] = run_http(args, config, spec, workdir)
    if "engine" in document and "http" in document:
        document["http_over_engine"] = {
            str(run["concurrency"]): run["summary"]["output_token_throughput"]
            / document["engine"][str(run["concurrency"])]["output_token_throughput"]
            for run in document["http"]
        }
        sys.stdout.write(f"http / engine output tok/s: {document['http_over_engine']}\n")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "full_stack.json").write_text(json.dumps(document, indent=2) + "\n")
        if document.get("http"):
            write_chart(
                document["http"], out / "full_stack.png", title=f"{args.model} via Ray Serve + HTTP (CPU)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
