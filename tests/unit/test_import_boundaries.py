"""Import boundaries of the package, checked two ways.

1. What a fresh interpreter loads (one test, a few subprocesses run side by side): model/,
   engine/, preprocess/, api/ and contracts never load Ray (only serve/ knows Ray); preprocess,
   contracts, the load generator and the Serve app / ingress modules never load torch, so
   CPU-only preprocessing and Ingress replicas stay light.
2. The static import graph (every `import` in every module, in-function ones included, parsed
   with `ast`): no cycles among cogvlm_ray modules, and each layer imports only the layers
   below it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cogvlm_ray

PACKAGE_DIR = Path(cogvlm_ray.__file__).parent

#: (modules imported in a fresh interpreter, modules that must then be absent from sys.modules)
RUNTIME_CHECKS: list[tuple[list[str], list[str]]] = [
    (
        [
            "cogvlm_ray.contracts",
            "cogvlm_ray.preprocess",
            "cogvlm_ray.preprocess.preprocessor",
            "cogvlm_ray.api.chat",
            "cogvlm_ray.api.protocol",
            "cogvlm_ray.loadgen.cli",
            "cogvlm_ray.loadgen.chart",
            "cogvlm_ray.loadgen.__main__",
        ],
        ["torch", "ray", "matplotlib"],
    ),
    (
        [
            "cogvlm_ray.model",
            "cogvlm_ray.model.quantization",
            "cogvlm_ray.engine.engine",
            "cogvlm_ray.hf",
        ],
        ["ray"],
    ),
    (["cogvlm_ray.serve.app", "cogvlm_ray.serve.ingress", "cogvlm_ray.serve.args"], ["torch"]),
]

#: Which cogvlm_ray layers each layer may import (besides itself).
ALLOWED_LAYERS: dict[str, set[str]] = {
    "config": set(),
    "errors": set(),
    "contracts": {"errors"},
    "preprocess": {"config", "errors", "contracts"},
    "model": {"config", "contracts"},
    "engine": {"model", "contracts", "config", "errors"},
    "hf": {"model", "preprocess", "contracts", "config", "errors"},
    "api": {"contracts", "errors", "config", "preprocess"},
    "serve": {"api", "engine", "model", "preprocess", "contracts", "config", "errors"},
    "batch": {"serve", "api", "engine", "model", "preprocess", "contracts", "config", "errors"},
    "loadgen": set(),
}


def _loaded_modules_check(modules: list[str], forbidden: list[str]) -> subprocess.Popen:
    code = (
        f"import sys\nimport {', '.join(modules)}\n"
        f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_fresh_imports_do_not_load_ray_or_torch_where_they_must_not() -> None:
    processes = [
        (modules, forbidden, _loaded_modules_check(modules, forbidden))
        for modules, forbidden in RUNTIME_CHECKS
    ]
    for modules, forbidden, process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, f"importing {modules} failed:\n{err}"
        assert out.strip() == "", f"importing {modules} loaded {out.strip()} (forbidden: {forbidden})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _known_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """cogvlm_ray modules `name` imports anywhere in its body (functions included)."""
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                module = f"{anchor}.{node.module}" if node.module else anchor
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _graph() -> dict[str, set[str]]:
    known = _known_modules()
    return {name: _imports_of(name, path, known) for name, path in known.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cogvlm_ray"


def test_import_graph_has_no_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layers_import_only_the_layers_below() -> None:
    violations = []
    for module, imports in sorted(_graph().items()):
        layer = _layer(module)
        if layer not in ALLOWED_LAYERS:
            continue
        for target in sorted(imports):
            other = _layer(target)
            if other != layer and other not in ALLOWED_LAYERS[layer]:
                violations.append(f"{module} imports {target} ({layer} -> {other})")
    assert not violations, "\n".join(violations)


def test_the_graph_sees_in_function_imports() -> None:
    """Guard the checker itself: a lazy import inside a function is an edge too."""
    graph = _graph()
    assert "cogvlm_ray.model.tiny" in graph["cogvlm_ray.serve.model_source"]  # imported inside a function
    assert "cogvlm_ray.engine.engine" in graph["cogvlm_ray.engine"]  # a TYPE_CHECKING / lazy export


def test_lazy_package_exports_still_resolve() -> None:
    from cogvlm_ray.engine import Engine, EngineConfig
    from cogvlm_ray.preprocess import PreprocessOptions, Preprocessor

    assert Engine.__name__ == "Engine" and EngineConfig.__name__ == "EngineConfig"
    assert Preprocessor.__name__ == "Preprocessor" and PreprocessOptions.__name__ == "PreprocessOptions"
