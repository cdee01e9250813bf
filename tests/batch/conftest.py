"""Live Ray Data tests: a handful of rows on the tiny models, in the session's one Ray cluster.

They borrow the cluster of the session-wide `serve_app` fixture (tests/conftest.py) instead of
starting their own (a second `ray.init` in one process is refused, and each cluster costs ~20 s
on 2 cores); the live app it runs is also the HTTP reference of the equivalence test.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cogvlm_ray.api.chat import ChatDefaults
from cogvlm_ray.batch.options import BatchOptions, InputSpec, PipelineSizing
from cogvlm_ray.serve.args import AppArgs

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cogvlm2-tiny"

#: Small pools: the session cluster also runs the Serve app (8 logical CPUs in all).
SIZING = PipelineSizing(num_cpus_per_actor=0.5, num_cpus_per_preprocess_task=0.5, batch_size=4,
                        preprocess_batch_size=4, max_retries=2)  # fmt: skip


@pytest.fixture(scope="session")
def ray_cluster(serve_app):
    return serve_app


def fixture_app_args(**engine) -> AppArgs:
    """The golden fixture checkpoint, as a CPU server replica would load it."""
    return AppArgs(model=str(FIXTURE), dtype="float32", device="cpu",
                   engine={"max_num_seqs": 4, "max_kv_tokens": 4096, **engine})  # fmt: skip


def batch_options(
    input_path: str | Path, output: str | Path, *, app: AppArgs | None = None, **fields
) -> BatchOptions:
    spec_fields = {k: fields.pop(k) for k in ("prompt", "format", "image_column", "prompt_column", "id_column",
                                              "limit") if k in fields}  # fmt: skip
    return BatchOptions(input=InputSpec(path=str(input_path), **spec_fields), output=str(output),
                        app=app or fixture_app_args(), defaults=ChatDefaults(max_tokens=6, temperature=0.0),
                        sizing=fields.pop("sizing", SIZING), **fields)  # fmt: skip


def image_folder(tmp: Path, *, broken: bool = True) -> Path:
    """The fixture's three images (+ one file that is not an image)."""
    folder = tmp / "images"
    folder.mkdir()
    for image in sorted((FIXTURE / "images").iterdir()):
        (folder / image.name).write_bytes(image.read_bytes())
    if broken:
        (folder / "broken.png").write_bytes(b"this is not a png")
    return folder


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
