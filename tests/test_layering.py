"""Data flows one way: every top-level module of detkit (and every module of detkit/inference/, which spans
layers) has a layer and imports only lower layers.

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
    "layers": 2, "ops": 2, "inference.layers": 2,
    "data": 3, "models": 3, "evaluation": 3, "visualization": 3,
    "checkpoint": 4, "inference.optimize": 4, "inference.int8": 4,
    "export": 5, "inference.openvino": 5.5,
    "engine": 6, "inference.predictor": 6, "inference.parts": 6, "inference.inputs": 6,
    "analysis": 7, "inference.runner": 7, "benchmark": 7, "serve": 7, "inference.__init__": 7,
    "cli": 8,
}
#: packages whose modules are layered one by one (the inference package spans layers 2 to 7)
SPLIT = ("inference",)


def _detkit_imports(path: Path) -> set[str]:
    """Layered units of detkit (:func:`_unit`) imported by a module (absolute or relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel_parts = path.relative_to(PKG).parts[:-1]
    found: set[str] = set()

    def add(mod: list[str], names: list[str]) -> None:
        if not mod:  # "from .. import x" at the package root: x are top-level modules
            found.update(_unit([n]) for n in names)
        elif mod[0] in SPLIT and len(mod) == 1:  # "from detkit.inference import x": x may be a module
            for n in names or [""]:
                sub = PKG / mod[0] / n
                found.add(_unit(mod + [n]) if n and (sub.is_dir() or sub.with_suffix(".py").is_file())
                          else _unit(mod))
        else:
            found.add(_unit(mod))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "detkit" and len(parts) > 1:
                    add(parts[1:], [])
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0 and node.module and node.module.startswith("detkit."):
                add(node.module.split(".")[1:], names)
            elif node.level > 0:
                base = list(rel_parts[: len(rel_parts) - (node.level - 1)])
                add(base + (node.module.split(".") if node.module else []), names)
    return found


def _unit(parts: list[str]) -> str:
    """The layered unit of a dotted module path inside detkit (``["inference", "int8", "graphs"]`` ->
    ``"inference.int8"``, ``["engine", "trainer"]`` -> ``"engine"``, ``["inference"]`` -> ``"inference.__init__"``)."""
    if parts[0] in SPLIT:
        return f"{parts[0]}.{parts[1]}" if len(parts) > 1 else f"{parts[0]}.__init__"
    return parts[0]


def _top_level(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if len(parts) == 1:
        return parts[0]
    return _unit(parts if parts[-1] != "__init__" or parts[0] not in SPLIT or len(parts) > 2 else parts[:1])


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
    assert {"inference.predictor", "checkpoint", "config"} <= found
