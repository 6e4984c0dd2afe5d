"""The package's import structure: layers from the CLI down to the passes, and no import cycles.

Layers, top to bottom: cli -> api (MixedPrecision) -> tuning/evaluation -> model, config,
capability, data, report, pipeline -> transforms -> errors. A module imports only from its
own layer or below (lazy imports inside functions included), and no two modules import each
other, directly or through others.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = (
    ("errors",),
    ("transforms.*",),
    ("config", "capability", "metrics", "common", "data", "model_io", "model", "report", "inventory",
     "plan_builder", "pipeline", "sensitivity", "tf_amp", "calibration", "int8_sensitivity", "variables"),
    ("evaluation", "tuning"),
    ("mixed_precision", "quantization", "experimental", "__init__"),
    ("cli", "__main__"),
)


def _modules() -> Dict[str, pathlib.Path]:
    """Module name relative to tf_bf16 ("config", "transforms.graph") -> source file."""
    out = {p.stem: p for p in (ROOT / "tf_bf16").glob("*.py")}
    out.update({f"transforms.{p.stem}": p for p in (ROOT / "transforms").glob("*.py") if p.stem != "__init__"})
    return out


def _layer(module: str) -> int:
    for level, names in enumerate(LAYERS):
        if module in names or (module.startswith("transforms.") and "transforms.*" in names):
            return level
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS")


def _imports(path: pathlib.Path, known: Set[str]) -> Set[str]:
    """tf_bf16 modules ``path`` imports anywhere in its code (top level or inside functions)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("tf_bf16."):
                rest = name[len("tf_bf16."):]
                if rest in known:
                    found.add(rest)
            elif name == "tf_bf16":
                found.update(a.name for a in node.names if a.name in known)  # from tf_bf16 import config
    return found


GRAPH = {m: _imports(p, set(_modules())) - {m} for m, p in _modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_its_layer_or_below(module):
    above = sorted(dep for dep in GRAPH[module] if _layer(dep) > _layer(module))
    assert above == [], f"{module} (layer {_layer(module)}) imports higher layers: {above}"


def test_no_import_cycles():
    state: Dict[str, int] = {}   # 1 = on the current path, 2 = done

    def visit(module: str, path: list) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
