"""Import boundaries: model/, engine/, preprocess/ and api/ never import Ray (STYLE), and the
Serve app module does not import torch, so CPU-only Ingress replicas stay ~180 MiB lighter."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imports(modules: str, forbidden: str) -> bool:
    code = f"import sys, {modules}; sys.exit(int({forbidden!r} in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], timeout=180).returncode == 1


@pytest.mark.parametrize(
    "module",
    [
        "cogvlm_ray.model",
        "cogvlm_ray.engine.engine",
        "cogvlm_ray.preprocess.preprocessor",
        "cogvlm_ray.model.quantization",
    ],
)
def test_library_packages_do_not_import_ray(module):
    assert not _imports(module, "ray")


def test_serve_app_does_not_import_torch():
    assert not _imports("cogvlm_ray.serve.app, cogvlm_ray.serve.ingress", "torch")


def test_lazy_package_exports_still_resolve():
    from cogvlm_ray.engine import Engine, EngineConfig
    from cogvlm_ray.preprocess import PreprocessOptions, Preprocessor

    assert Engine.__name__ == "Engine" and EngineConfig.__name__ == "EngineConfig"
    assert Preprocessor.__name__ == "Preprocessor" and PreprocessOptions.__name__ == "PreprocessOptions"
