"""One CLI wrapper (detkit.cli.run_cli) with one exit-code convention, and the one atomic file writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detkit.checkpoint import CheckpointError
from detkit.cli import run_cli
from detkit.errors import DetkitError, UsageError
from detkit.fileio import atomic_write, write_json_atomic


@pytest.mark.parametrize("error", [UsageError("--num 0: must be at least 1"), CheckpointError("a.pth: corrupt"),
                                   ValueError("bad value"), FileNotFoundError("no such file: x.json"),
                                   FloatingPointError("loss is nan at iteration 3")])
def test_bad_input_is_one_line_and_exit_2(error: Exception, capsys) -> None:
    def main(argv):
        raise error

    assert run_cli(main, [], prog="tool.py") == 2
    err = capsys.readouterr().err
    assert err == f"tool.py: error: {error}\n"


def test_success_returns_mains_code_and_bugs_keep_their_traceback(capsys) -> None:
    assert run_cli(lambda argv: None) == 0
    assert run_cli(lambda argv: 3) == 3

    def bug(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_cli(bug, [])


def test_interrupt_is_130(capsys) -> None:
    def main(argv):
        raise KeyboardInterrupt

    assert run_cli(main, [], prog="tool.py") == 130
    assert "interrupted" in capsys.readouterr().err


def test_every_detkit_error_is_a_detkit_error() -> None:
    from detkit.config import ConfigError
    from detkit.data import DatasetError, ImageReadError
    from detkit.export import ExportError

    assert all(issubclass(t, DetkitError) for t in (ConfigError, DatasetError, ImageReadError, CheckpointError,
                                                     ExportError, UsageError))


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "sub" / "m.json", {"a": 1})
    assert path.read_text() == '{"a": 1}'
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"a": 2, "trunc')
            raise RuntimeError("disk full")
    assert path.read_text() == '{"a": 1}'
    assert os.listdir(tmp_path / "sub") == ["m.json"]  # no temporary file left behind
