"""Batch results equal the server's, token for token (greedy), and the CLI runs end to end.

* Fixture checkpoint: an OpenAI Batch file built from the golden cases goes through the Ray
  Data pipeline; the same bodies go through the server's own path in this process (the
  ingress's conversions, `PreprocessServer.prepare`, `ModelServer.generate` over the engine
  `load_engine` builds). Token ids must be equal, and equal the golden (official) ids for the
  image cases.
* Live app: `python -m cogvlm_ray.batch` in a subprocess, connected to the session's cluster via
  RAY_ADDRESS, on the same tiny random model as the session's Serve app; its OpenAI Batch
  output bodies must match the app's HTTP answers to the same bodies.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from cogvlm_ray.api.chat import ChatDefaults, check_supported, to_conversation, to_sampling_params
from cogvlm_ray.api.protocol import ChatCompletionRequest
from cogvlm_ray.batch.pipeline import run
from cogvlm_ray.serve.factories import load_engine, make_preprocessor
from cogvlm_ray.serve.server import ModelServer, PreprocessServer
from tests.batch.conftest import FIXTURE, batch_options, data_url, fixture_app_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def golden_bodies() -> dict[str, tuple[dict, list[int]]]:
    """custom_id -> (chat body, golden greedy ids) for the fixture's five cases."""
    meta = json.loads((FIXTURE / "cases.json").read_text())
    out = {}
    for case in meta["cases"]:
        messages: list[dict] = []
        for question, answer in case["history"]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": case["query"]})
        if case["image"]:
            image = FIXTURE / meta["preprocess"][case["image"]]["file"]
            first = messages[0]
            first["content"] = [{"type": "text", "text": first["content"]},
                                {"type": "image_url", "image_url": {"url": data_url(image)}}]  # fmt: skip
        body = {"model": "cogvlm2-tiny", "messages": messages, "max_tokens": meta["max_new_tokens"],
                "temperature": 0.0, "template_version": case["template"]}  # fmt: skip
        out[case["name"]] = (body, case["generated_ids"])
    return out


def write_batch_file(path: Path, bodies: dict[str, dict]) -> None:
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
             for cid, body in bodies.items()]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def server_path_token_ids(bodies: dict[str, dict]) -> dict[str, list[int]]:
    """What the server computes for each body: ingress conversions -> Preprocessor -> ModelServer."""
    args = fixture_app_args()
    defaults = ChatDefaults(max_tokens=args.default_max_tokens)
    preprocess = PreprocessServer(make_preprocessor(args, FIXTURE))

    async def all_bodies() -> dict[str, list[int]]:
        server = ModelServer(lambda: load_engine(args, FIXTURE))
        out = {}
        try:
            for cid, raw in bodies.items():
                request = ChatCompletionRequest.model_validate(raw)
                check_supported(request)
                params = to_sampling_params(request, defaults)
                prepared = await preprocess.prepare(to_conversation(request), params.max_tokens,
                                                    request.template_version)  # fmt: skip
                out[cid] = [t async for o in server.generate(prepared, params, cid) for t in o.new_token_ids]
        finally:
            await server.shutdown()
        return out

    return asyncio.run(all_bodies())


def test_batch_equals_the_server_engine_path_token_for_token(ray_cluster, tmp_path):
    cases = golden_bodies()
    bodies = {cid: body for cid, (body, _) in cases.items()}
    write_batch_file(tmp_path / "batch.jsonl", bodies)
    out = tmp_path / "out.parquet"
    summary = run(batch_options(tmp_path / "batch.jsonl", out))
    assert (summary.num_rows, summary.num_errors) == (5, 0)
    batch = {row["id"]: row["token_ids"] for row in pq.read_table(out).to_pylist()}

    expected = server_path_token_ids(bodies)
    assert batch == expected
    assert all(len(ids) == 12 for ids in batch.values())
    # The image cases also give the official greedy ids. The text-only one does not, on purpose:
    # the server puts the model card's preamble before a text-only first turn (preprocess/messages.py).
    for name in ("chat_image", "base_image", "vqa_image", "chat_history_image"):
        assert batch[name] == cases[name][1], name


def test_cli_on_the_live_cluster_answers_like_the_http_server(ray_cluster, tmp_path):
    cases = golden_bodies()
    bodies = {cid: {**body, "max_tokens": 8} for cid, (body, _) in cases.items()}
    bodies["too_long"] = {"messages": [{"role": "user", "content": "word " * 9000}], "max_tokens": 8}
    write_batch_file(tmp_path / "batch.jsonl", bodies)
    with open(tmp_path / "batch.jsonl", "a") as f:
        f.write("this line is not JSON\n")

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "cogvlm_ray.batch", str(tmp_path / "batch.jsonl"), "--output", str(out),
               "--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--cache-dir",
               str(tmp_path / "models"), "--max-num-seqs", "4", "--max-kv-tokens", "16384", "--num-cpus", "0.5",
               "--batch-size", "4"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MapBatches(EngineStage)" in done.stderr  # Ray Data's progress
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["errors"]) == (7, 2)

    lines = {line["custom_id"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert len(lines) == 7
    assert lines["too_long"]["response"]["status_code"] == 400
    assert lines["too_long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    (invalid,) = [line for cid, line in lines.items() if cid.startswith("invalid-line-")]
    assert invalid["response"]["status_code"] == 400

    app = ray_cluster
    for cid in cases:
        answer = httpx.post(f"{app.base_url}/v1/chat/completions", json={**bodies[cid], "model": app.model},
                            headers=app.headers, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        http, batch = answer.json(), lines[cid]["response"]["body"]
        assert lines[cid]["response"]["status_code"] == 200 and batch["object"] == "chat.completion"
        assert batch["choices"][0]["message"] == http["choices"][0]["message"], cid
        assert batch["choices"][0]["finish_reason"] == http["choices"][0]["finish_reason"]
        assert batch["usage"] == http["usage"]
