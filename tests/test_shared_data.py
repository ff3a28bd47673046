"""tests/shared_data.py: DETKIT_COCO128 moves the shared data; a test that needs it skips without it,
and under CI that skip is a failure (conftest.py).

The two runs are pytest sessions in this process (``pytester``), on a test file written here that asks for
the data, with this suite's own conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared_data import ENV, SKIP_REASON, coco128_root

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
NEEDS_DATA = """
from shared_data import require_coco128

def test_needs_the_data():
    assert (require_coco128() / "annotations.json").is_file()
"""


def test_env_override_and_ci_turns_the_skip_into_a_failure(pytester: pytest.Pytester, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path))
    assert coco128_root() == tmp_path
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_needs_data=NEEDS_DATA)
    monkeypatch.setenv(ENV, str(tmp_path / "absent"))
    monkeypatch.delenv("CI", raising=False)
    local = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    local.assert_outcomes(skipped=1)
    assert SKIP_REASON in local.stdout.str()
    monkeypatch.setenv("CI", "true")
    ci = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    ci.assert_outcomes(failed=1)
    assert "skipped in CI" in ci.stdout.str()
