"""Latency of the serving path itself: HTTP -> Ingress -> Preprocessor -> ModelServer -> HTTP.

Starts a local Ray cluster with the real app on the tiny random model (the integration test
args), sends sequential `max_tokens=1` requests (text, a new image each time, the same image each
time) and prints p50/p90 per kind as JSON. The model is tiny, so this measures the hops, image
decoding and resizing, not generation. Results: docs/serving.md ("Measured overhead").

    python bench/serve_overhead.py --requests 30
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from cogvlm_ray.serve.ports import free_port
from tests.integration.conftest import API_KEY, integration_app_args  # the test suite's app (PYTHONPATH=.)


def png_data_url(color: tuple[int, int, int], size: tuple[int, int] = (1344, 1008)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_content(url: str) -> list[dict]:
    return [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]


def measure(url: str, contents: list, warmup: int) -> dict[str, float]:
    latencies = []
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        for content in contents:
            started = time.perf_counter()
            response = client.post(
                url, json={"messages": [{"role": "user", "content": content}], "max_tokens": 1}
            )
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
    kept = sorted(latencies[warmup:])
    return {"p50_ms": 1000 * statistics.median(kept), "p90_ms": 1000 * kept[max(int(0.9 * len(kept)) - 1, 0)]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=30, help="per kind")
    parser.add_argument("--warmup", type=int, default=5, help="leading requests dropped per kind")
    options = parser.parse_args()

    import ray
    from ray import serve

    from cogvlm_ray.serve.app import build_app

    ray.init(
        address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="warning"
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        serve.run(build_app(integration_app_args(Path(tempfile.mkdtemp()))), name="cogvlm", route_prefix="/")
        ready_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        n = options.requests
        same = png_data_url((90, 160, 40))
        kinds = {
            "text": ["Describe a cat."] * n,
            "new_image": [image_content(png_data_url((i % 256, 160, 40))) for i in range(n)],
            "same_image": [image_content(same)] * n,
        }
        results = {kind: measure(url, contents, options.warmup) for kind, contents in kinds.items()}
        print(json.dumps({"serve_run_ready_s": round(ready_s, 1), **results}, indent=2))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
