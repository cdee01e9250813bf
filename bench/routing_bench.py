"""Routing benchmark: Serve's default power-of-two routing vs image-affinity routing.

    python bench/routing_bench.py [--images 24] [--turns 4] [--concurrency 4] [--max-tokens 8]
                                  [--rounds 4] [--preset bench] [--image-size 448] [--json out.json]

For each policy, one Serve application (the real app: ingress, preprocessor, 2 ModelServer
replicas, float32 on CPU) runs in one local Ray cluster, and the same multi-turn workload goes to
each through HTTP: `--images` conversations, each about its own image (JPEG), `--turns` turns
sent one after another with the chat history (turn k carries the image, the earlier questions
and the answers), `--concurrency` conversations at a time, streamed, greedy, `--max-tokens`
tokens per answer (ignore_eos).
The model is the random `--preset` checkpoint (`bench`: LM hidden 512, 8 layers; vision hidden
256, 4 layers) with `--image-size` px images: 448 px gives 1,025 vision-tower tokens and 258
image positions, so that, as with the real model (2,306 image positions), the image dominates
the prompt and a cache miss is costly.
Both apps are up for the whole run but only one is driven at a time; the images are split into
`--rounds` rounds that alternate the order of the policies (A B, B A, ...), so drifts in the
machine's background load hit both policies alike.

Reported per policy, from the replicas' own engine stats (deltas over the workload):
* vision-tower runs = image-feature cache misses (queries - hits). A request reuses its image
  without the tower in two ways: an image-feature cache hit, or a prefix-cache hit covering the
  whole image span (then the engine does not even query the image cache; with the chat history
  this is the usual case for a follow-up on the same replica). So the engine's own
  hits / queries ratio undercounts reuse, and the rates below count tower runs instead;
* cache hit rate = 1 - tower runs / image requests, over all turns; the first turn of a
  conversation always runs the tower, so the best possible is (turns - 1) / turns;
* follow-up hit rate = 1 - (tower runs - conversations) / follow-up turns (turns 2..N): the
  fraction of follow-ups whose replica already had the image (1.0 is perfect affinity);
* the raw image-cache hits / queries and prefix-cache tokens reused;
* client-side TTFT (first content chunk) p50/p90, over all turns and over follow-ups;
* routing decisions of the affinity router (from the ingress `/metrics`).

Both model replicas share the machine's cores, so routing changes where work runs, not how much
compute exists; the numbers show the cache effect, not replica scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from cogvlm_ray.loadgen.client import RequestResult, send_request
from cogvlm_ray.loadgen.workload import BenchRequest, make_image_data_url
from cogvlm_ray.serve.ports import free_port

logger = logging.getLogger("routing_bench")

MODEL_SERVER = "ModelServer"
QUESTIONS = ("What is in this picture?", "What colours do you see?", "Describe the top left corner.",
             "Is there any text?", "What would you title it?", "Anything else?")  # fmt: skip


@dataclass
class PolicyResult:
    policy: str
    num_requests: int
    num_failed: int
    image_cache_hits: int
    image_cache_queries: int
    vision_tower_runs: int
    hit_rate: float
    follow_up_hit_rate: float
    prefix_cache_hit_tokens: int
    ttft_p50_s: float
    ttft_p90_s: float
    follow_up_ttft_p50_s: float
    follow_up_ttft_p90_s: float
    wall_s: float
    routing_decisions: dict[str, float]


def with_deployment_options(app: Any, options: dict[str, dict[str, Any]]) -> Any:
    """Rebind every deployment of a built application with extra options (like a Serve config's
    `deployments:` section), keeping the args `build_app` bound."""
    from ray.serve import Application

    deployment = app._bound_deployment
    args = [
        with_deployment_options(a, options) if isinstance(a, Application) else a for a in deployment.init_args
    ]
    return deployment.options(**options.get(deployment.name, {})).bind(*args, **deployment.init_kwargs)


def replica_stats(app_name: str, num_replicas: int) -> dict[str, Any]:
    """replica id -> EngineStats, asking through the handle until every replica answered."""
    from ray import serve

    handle = serve.get_deployment_handle(MODEL_SERVER, app_name=app_name)
    seen: dict[str, Any] = {}
    for _ in range(500):
        replica_id, stats = handle.get_replica_stats.remote().result()
        seen[replica_id] = stats
        if len(seen) >= num_replicas:
            return seen
    raise RuntimeError(f"only {len(seen)} of {num_replicas} replicas answered")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_conversations(
    url: str, args: argparse.Namespace, images: list[str]
) -> list[tuple[int, RequestResult]]:
    """(turn, result) for every request; conversations run `args.concurrency` at a time."""
    semaphore = asyncio.Semaphore(args.concurrency)
    results: list[tuple[int, RequestResult]] = []

    async def conversation(client: httpx.AsyncClient, index: int, image: str) -> None:
        async with semaphore:
            messages: list[dict[str, Any]] = []
            for turn in range(args.turns):
                question = QUESTIONS[turn % len(QUESTIONS)]
                if turn == 0:
                    content: Any = [
                        {"type": "text", "text": question},
                        {"type": "image_url", "image_url": {"url": image}},
                    ]
                else:
                    content = question
                messages.append({"role": "user", "content": content})
                body = {"model": "bench", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
                        "stream": True, "ignore_eos": True}  # fmt: skip
                request = BenchRequest(index=index * args.turns + turn, body=body, is_stream=True, has_image=True,
                                       is_repeated_image=turn > 0)  # fmt: skip
                result = await send_request(client, url, request)
                results.append((turn, result))
                messages.append({"role": "assistant", "content": result.text or "ok"})

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(conversation(client, i, image) for i, image in enumerate(images)))
    return results


def routing_decisions(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    pattern = r'^cogvlm_routing_decisions_total\{(?=.*outcome="(\w+)")(?=.*reason="(\w+)").*\} (\S+)$'
    return {f"{o}/{r}": float(v) for o, r, v in re.findall(pattern, text, flags=re.M)}


@dataclass
class DeployedApp:
    policy: str
    app_name: str
    base_url: str
    """http://host:port/<route> (no /v1)."""

    @property
    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"


def bench_checkpoint(args: argparse.Namespace) -> Path:
    """The random `--preset` checkpoint with `--image-size` px images (created once, cached)."""
    from cogvlm_ray.model.tiny import make_tiny_checkpoint

    path = args.cache_dir / f"routing-bench-{args.preset}-{args.image_size}px"
    if not (path / "config.json").is_file():
        make_tiny_checkpoint(path, preset=args.preset, vision_overrides={"image_size": args.image_size})
    return path


def deploy(policy: str, server_url: str, args: argparse.Namespace, tmp: Path) -> DeployedApp:
    """One app per policy (its own route, metrics directory and 2 fresh ModelServer replicas)."""
    from ray import serve

    from cogvlm_ray.serve.app import build_app

    app_args = {
        "model": str(bench_checkpoint(args)), "served_model_name": "bench", "dtype": "float32", "device": "cpu",
        "cache_dir": str(args.cache_dir), "metrics_dir": str(tmp / f"prom_{policy}"), "ray_metrics": False,
        "engine": {"max_num_seqs": 8, "max_kv_tokens": 65536, "image_cache_bytes": 1 << 28},
        "max_queued_requests": 256, "default_max_tokens": args.max_tokens,
        "routing": {"policy": policy},
    }  # fmt: skip
    app = with_deployment_options(build_app(app_args), {
        "Preprocessor": {"ray_actor_options": {"num_cpus": 0.2}},
        MODEL_SERVER: {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.4}},
        "Ingress": {"ray_actor_options": {"num_cpus": 0.2}},
    })  # fmt: skip
    started = time.perf_counter()
    serve.run(app, name=f"bench_{policy}", route_prefix=f"/{policy}")
    logger.info("%s: app up in %.1f s", policy, time.perf_counter() - started)
    deployed = DeployedApp(policy, f"bench_{policy}", f"{server_url}/{policy}")
    # Warm-up (not measured): one-turn conversations about other images, so that both replicas
    # have run the vision tower and a prefill once.
    warmup = [make_image_data_url(args.image_size, 10_000 + i) for i in range(4)]
    warmup_args = argparse.Namespace(**{**vars(args), "turns": 1, "concurrency": 2})
    asyncio.run(run_conversations(deployed.chat_url, warmup_args, warmup))
    return deployed


def run_rounds(apps: list[DeployedApp], args: argparse.Namespace) -> list[PolicyResult]:
    """The same workload on every app, in `args.rounds` rounds that alternate the order of the
    apps (ABBA...), so slow changes in the machine's background load hit every policy alike.
    Each round has its own images; each app sees every image exactly once."""
    images = [make_image_data_url(args.image_size, seed) for seed in range(args.images)]
    chunks = [images[i :: args.rounds] for i in range(args.rounds)]
    before = {app.policy: replica_stats(app.app_name, 2) for app in apps}
    results: dict[str, list[tuple[int, RequestResult]]] = {app.policy: [] for app in apps}
    wall: dict[str, float] = {app.policy: 0.0 for app in apps}
    for index, chunk in enumerate(chunks):
        for app in apps if index % 2 == 0 else reversed(apps):
            started = time.perf_counter()
            results[app.policy] += asyncio.run(run_conversations(app.chat_url, args, chunk))
            wall[app.policy] += time.perf_counter() - started
    return [summarize(app, results[app.policy], before[app.policy], wall[app.policy], args) for app in apps]


def summarize(
    app: DeployedApp,
    results: list[tuple[int, RequestResult]],
    before: dict[str, Any],
    wall_s: float,
    args: argparse.Namespace,
) -> PolicyResult:
    after = replica_stats(app.app_name, 2)
    hits = sum(after[r].image_cache_hits - before[r].image_cache_hits for r in after)
    queries = sum(after[r].image_cache_queries - before[r].image_cache_queries for r in after)
    prefix = sum(after[r].prefix_cache_hit_tokens - before[r].prefix_cache_hit_tokens for r in after)
    ok = [(turn, r) for turn, r in results if r.ok and r.ttft_s is not None]
    ttft = [r.ttft_s for _, r in ok]
    follow_up_ttft = [r.ttft_s for turn, r in ok if turn > 0]
    num_follow_ups = args.images * (args.turns - 1)
    decisions = routing_decisions(app.base_url) if app.policy == "image_affinity" else {}
    return PolicyResult(
        policy=app.policy, num_requests=len(results), num_failed=len(results) - len(ok),
        image_cache_hits=hits, image_cache_queries=queries, vision_tower_runs=queries - hits,
        hit_rate=1 - (queries - hits) / max(len(results), 1),
        follow_up_hit_rate=1 - (queries - hits - args.images) / max(num_follow_ups, 1), prefix_cache_hit_tokens=prefix,
        ttft_p50_s=percentile(ttft, 0.5), ttft_p90_s=percentile(ttft, 0.9),
        follow_up_ttft_p50_s=percentile(follow_up_ttft, 0.5), follow_up_ttft_p90_s=percentile(follow_up_ttft, 0.9),
        wall_s=wall_s, routing_decisions=decisions,
    )  # fmt: skip


def report(results: list[PolicyResult], args: argparse.Namespace) -> str:
    lines = [
        f"{args.images} conversations x {args.turns} turns, {args.concurrency} at a time, {args.max_tokens} tokens "
        f"per answer, 2 ModelServer replicas of random {args.preset} preset with {args.image_size}-px images (float32, CPU), {os.cpu_count()} cores "
        f"shared by everything ({platform.processor() or platform.machine()})",
        "",
        "| routing | requests (failed) | vision-tower runs | cache hit rate | follow-up hit rate "
        "| image-cache hits / queries | prefix tokens reused | TTFT p50 / p90 (all) | TTFT p50 / p90 (follow-ups) "
        "| wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.num_requests} ({r.num_failed}) | {r.vision_tower_runs} | {r.hit_rate:.2f} "
            f"| {r.follow_up_hit_rate:.2f} | {r.image_cache_hits} / {r.image_cache_queries} | {r.prefix_cache_hit_tokens} "
            f"| {r.ttft_p50_s * 1000:.0f} / {r.ttft_p90_s * 1000:.0f} ms "
            f"| {r.follow_up_ttft_p50_s * 1000:.0f} / {r.follow_up_ttft_p90_s * 1000:.0f} ms | {r.wall_s:.1f} s |"
        )
    for r in results:
        if r.routing_decisions:
            lines.append(f"\nrouting decisions ({r.policy}): {r.routing_decisions}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the policies (ABBA...)")
    parser.add_argument("--preset", default="bench")
    parser.add_argument(
        "--image-size", type=int, default=448, help="vision input size (448: 258 image positions)"
    )
    parser.add_argument("--policies", default="power_of_two,image_affinity")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/cogvlm_ray").expanduser())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import ray
    from ray import serve

    started = time.perf_counter()
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="warning"
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as tmp:
            server_url = f"http://127.0.0.1:{port}"
            apps = [deploy(policy, server_url, args, Path(tmp)) for policy in args.policies.split(",")]
            results = run_rounds(apps, args)
    finally:
        ray.shutdown()
    text = report(results, args)
    logger.info("results:\n%s", text)
    logger.info("total %.0f s", time.perf_counter() - started)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": [asdict(r) for r in results]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
