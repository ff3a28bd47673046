"""Data flows one way: every top-level module of detkit has a layer and imports only lower layers.

The package root (``detkit/__init__.py``) is exempt: it re-exports lazily from the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "detkit"

# top-level module or subpackage of detkit -> layer; a module imports only strictly lower layers,
# so modules of one layer never import each other (data and models stay independent) and there is
# no import loop. A new top-level module must be given a layer here.
LAYER = {
    "errors": 0, "fileio": 0,
    "structures": 1, "config": 1, "machine": 1,
    "layers": 2, "ops": 2,
    "data": 3, "models": 3, "evaluation": 3, "visualization": 3,
    "checkpoint": 4, "speed": 4, "quantize": 4,
    "export": 5,
    "engine": 6, "predictor": 6,
    "analysis": 7, "infer": 7, "benchmark": 7, "serve": 7, "infer_parts": 6, "infer_io": 6,
    "cli": 8,
}


def _detkit_imports(path: Path) -> set[str]:
    """Top-level detkit subpackages imported by a module (absolute or relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel_parts = path.relative_to(PKG).parts[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "detkit" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("detkit."):
                found.add(node.module.split(".")[1])
            elif node.level > 0:
                base = list(rel_parts[: len(rel_parts) - (node.level - 1)])
                mod = base + (node.module.split(".") if node.module else [])
                if mod:
                    found.add(mod[0])
                else:  # "from .. import x" at package root
                    found.update(a.name for a in node.names)
    return found


def _top_level(path: Path) -> str:
    return path.relative_to(PKG).parts[0].removesuffix(".py")


def test_every_top_level_module_has_a_layer() -> None:
    modules = {_top_level(p) for p in PKG.rglob("*.py")} - {"__init__"}
    assert not modules - set(LAYER), f"give these detkit modules a layer in LAYER: {sorted(modules - set(LAYER))}"


def test_layers_import_only_downstream() -> None:
    violations = []
    for path in PKG.rglob("*.py"):
        layer = _top_level(path)
        if layer == "__init__":
            continue
        for imported in _detkit_imports(path) - {layer}:
            if LAYER.get(imported, 99) >= LAYER[layer]:
                violations.append(f"{path.relative_to(PKG)} (layer {LAYER[layer]}) imports detkit.{imported} "
                                  f"(layer {LAYER.get(imported, '?')})")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_models_build_without_loading() -> None:
    # build_detector builds and loads nothing: detkit.checkpoint loads afterwards
    assert LAYER["checkpoint"] > LAYER["models"]
    imported = set().union(*(_detkit_imports(p) for p in (PKG / "models").rglob("*.py")))
    assert "checkpoint" not in imported


def test_the_checker_sees_imports() -> None:
    # guard against a checker that silently finds nothing: the package root imports lazily
    # from these three modules with relative imports
    found = _detkit_imports(PKG / "__init__.py")
    assert {"predictor", "checkpoint", "config"} <= found
