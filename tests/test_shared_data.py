"""tests/shared_data.py: DETKIT_COCO128 moves the shared data; a test that needs it skips without it,
and under CI that skip is a failure (conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared_data import ENV, SKIP_REASON, coco128_root

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_evaluation.py::test_coco128_perfect_predictions"


def _pytest(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_env_override_and_ci_turns_the_skip_into_a_failure(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path))
    assert coco128_root() == tmp_path
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[ENV] = str(tmp_path / "absent")
    local = _pytest(env)
    assert local.returncode == 0 and "1 skipped" in local.stdout and SKIP_REASON in local.stdout, local.stdout
    ci = _pytest({**env, "CI": "true"})
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "skipped in CI" in ci.stdout, ci.stdout
