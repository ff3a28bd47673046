"""Data flows one way: structures <- data/models/evaluation <- engine <- tools."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "detkit"

# layer -> detkit subpackages it must never import
FORBIDDEN = {
    "structures": {"data", "models", "evaluation", "engine", "predictor", "checkpoint", "config"},
    "config": {"data", "models", "evaluation", "engine", "predictor", "checkpoint"},
    "layers": {"data", "models", "evaluation", "engine", "predictor", "checkpoint"},
    "data": {"models", "evaluation", "engine", "predictor", "checkpoint"},
    "models": {"data", "evaluation", "engine", "predictor"},
    "evaluation": {"data", "models", "engine", "predictor", "checkpoint"},
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


def test_layers_import_only_downstream() -> None:
    violations = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        layer = rel.parts[0].removesuffix(".py")
        for imported in _detkit_imports(path) & FORBIDDEN.get(layer, set()):
            violations.append(f"{rel} imports detkit.{imported}")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_the_checker_sees_imports() -> None:
    # guard against a checker that silently finds nothing: the package root imports lazily
    # from these three modules with relative imports
    found = _detkit_imports(PKG / "__init__.py")
    assert {"predictor", "checkpoint", "config"} <= found
