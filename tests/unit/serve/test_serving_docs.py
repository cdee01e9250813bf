"""docs/serving.md documents every AppArgs field and every metric (checked against the code)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from cogvlm_ray.serve.app import AppArgs
from cogvlm_ray.serve.metrics import METRICS

DOC = (Path(__file__).resolve().parents[3] / "docs" / "serving.md").read_text()


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _fields(annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_every_app_arg_is_in_the_configuration_reference():
    missing = [name for name in _fields(AppArgs) if f"| `{name}` |" not in DOC]
    assert not missing, f"document these AppArgs fields in docs/serving.md: {missing}"


def test_every_metric_is_in_the_metrics_table():
    missing = []
    for spec in METRICS:
        shown = spec.name + ("_total" if spec.kind == "counter" else "")
        if f"| `{shown}` | {spec.kind}" not in DOC:
            missing.append(shown)
    assert not missing, f"document these metrics in docs/serving.md: {missing}"
