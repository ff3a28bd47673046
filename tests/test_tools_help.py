"""Every command-line tool's --help exits 0 and shows examples of itself (the module docstring or epilog)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py") if not p.name.startswith("_"))


def test_all_tools_are_covered() -> None:
    assert {"train_det.py", "eval_det.py", "pretrain_cls.py", "infer.py", "benchmark.py"} <= set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_0_and_shows_examples(tool: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"python tools/{tool} " in r.stdout, r.stdout
    assert "examples:" in r.stdout.lower(), r.stdout
    assert not list(tmp_path.iterdir()), "--help must not write anything"
