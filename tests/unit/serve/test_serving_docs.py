"""docs/serving.md documents every AppArgs field and every metric (checked against the code)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pydantic import BaseModel

from cogvlm_ray.serve.args import AppArgs
from cogvlm_ray.serve.metrics import METRICS

DOC = (Path(__file__).resolve().parents[3] / "docs" / "serving.md").read_text()


def _fields(model: type, prefix: str = "") -> list[str]:
    """Every leaf field, nested sections (pydantic models and dataclasses) flattened with dots."""
    if dataclasses.is_dataclass(model):
        items = [(f.name, f.type) for f in dataclasses.fields(model)]
        hints = {name: model.__annotations__.get(name) for name, _ in items}
        items = [(name, hints[name]) for name, _ in items]
    else:
        items = [(name, field.annotation) for name, field in model.model_fields.items()]
    names = []
    for name, annotation in items:
        if isinstance(annotation, type) and (
            issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
        ):
            names += _fields(annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def _default(path: str) -> object:
    value: object = AppArgs()
    for part in path.split("."):
        value = getattr(value, part)
    return value


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


def test_the_documented_defaults_are_the_code_defaults():
    """Plain numbers and booleans in the table's default column match the one code default."""
    wrong = []
    for name in _fields(AppArgs):
        row = re.search(rf"^\| `{re.escape(name)}` \| ([^|]+) \|", DOC, re.M)
        shown = row.group(1).strip() if row else ""
        if re.fullmatch(r"-?[\d,]+(\.\d+)?", shown):
            ok = float(shown.replace(",", "")) == float(_default(name))  # type: ignore[arg-type]
        elif shown in ("true", "false"):
            ok = _default(name) is (shown == "true")
        else:
            continue  # prose defaults ("auto", "20 MiB", ...) are not parsed
        if not ok:
            wrong.append(f"{name}: docs say {shown}, code says {_default(name)!r}")
    assert not wrong, wrong
