"""Smoke test of the shipped CPU demo config: `serve run serve_config.local.yaml` as a user runs it
(a temp copy with a free port and temp dirs), talked to over HTTP, stopped with SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def local_config_copy(tmp_path: Path, port: int) -> Path:
    config = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["cache_dir"] = str(tmp_path / "models")
    args["metrics_dir"] = str(tmp_path / "prom")
    args["request_timeout_s"] = 5  # so a deliberately endless request shows the 504
    path = tmp_path / "serve_config.local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve run exited early"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"app not ready after {timeout_s} s")


def test_serve_run_local_config(tmp_path: Path):
    port = free_port()
    config = local_config_copy(tmp_path, port)
    log = open(tmp_path / "serve_run.log", "w")  # noqa: SIM115 (closed in finally)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COGVLM_API_KEY": ""}
    # -a local: always a fresh cluster, never the test session's (or anyone else's) running one.
    process = subprocess.Popen(
        [sys.executable, "-m", "ray.serve.scripts", "run", "-a", "local", str(config)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout_s=200)
        models = httpx.get(url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["cogvlm2-tiny-random"]
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "temperature": 0}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
        endless = {"messages": body["messages"], "max_tokens": 8000, "ignore_eos": True}
        timed_out = httpx.post(url + "/v1/chat/completions", json=endless, timeout=60)
        assert timed_out.status_code == 504, timed_out.text
        assert timed_out.json()["error"]["type"] == "timeout_error"
        assert "cogvlm_generation_tokens_total" in httpx.get(url + "/metrics", timeout=10).text
        assert httpx.get(url + "/", timeout=10).status_code == 200  # the playground is on in the demo
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode is not None
