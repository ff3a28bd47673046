"""tools/serve.py's settings without a running server: option checks, a port in use, the serve extra
missing (one line saying how to install it), and the core of detkit.serve importing without it."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from detkit.cli import run_cli
from detkit.errors import UsageError
from detkit.serve.server import bind_socket
from detkit.serve.settings import ServeOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field,value,flag", [("max_batch", 0, "--max-batch"), ("max_wait_ms", -1.0, "--max-wait-ms"),
                                              ("queue_size", 0, "--queue-size"), ("max_bytes", 0, "--max-bytes"),
                                              ("max_pixels", -5, "--max-pixels"), ("port", 70000, "--port"),
                                              ("precision", "fp8", "--precision")])
def test_bad_options_are_one_line_usage_errors(field: str, value: Any, flag: str) -> None:
    with pytest.raises(UsageError, match=re.escape(flag)):
        ServeOptions(**{field: value}).validate()


def test_port_in_use_is_a_usage_error() -> None:
    taken = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(UsageError, match="--port"):
            bind_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_missing_serve_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """What tools/serve.py's main calls first: one line naming the missing package and the pip command."""
    from detkit.serve.settings import check_serve_extra

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: find_spec raises ValueError
    assert run_cli(lambda argv: check_serve_extra(), [], prog="serve.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("serve.py: error:"), err
    assert "fastapi" in err[0] and "pip install -e '.[serve]'" in err[0]


def test_core_modules_do_not_need_fastapi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the serve extra, detkit.serve's settings, decoding and batcher import; only the app does not."""
    import importlib

    import detkit

    monkeypatch.setattr(detkit, "serve", sys.modules["detkit.serve"])  # restored after the re-imports below
    for name in [m for m in sys.modules if m == "detkit.serve" or m.startswith("detkit.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("fastapi", "uvicorn", "starlette", "python_multipart", "multipart"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    for name in ("detkit.serve", "detkit.serve.settings", "detkit.serve.decode", "detkit.serve.batcher"):
        importlib.import_module(name)
    with pytest.raises(ImportError):
        importlib.import_module("detkit.serve.app")


_OPENCV_LIMIT = """
import os, runpy, sys
sys.argv = ["serve.py", "--max-pixels=5000", "--port", "0"]
runpy.run_path(sys.argv_path, run_name="serve_tool")  # the tool's imports, not its main()
import cv2, numpy as np
from detkit.serve.decode import ImageRejected, decode_image
ok, png = cv2.imencode(".png", np.zeros((100, 100, 3), np.uint8))
try:
    decode_image(png.tobytes(), 10**9, 10**9)  # the header check lets it through: OpenCV's limit decides
    print(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS"), "decoded")
except ImageRejected as e:
    print(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS"), e.status, e.message)
"""


def test_serve_tool_gives_opencv_the_max_pixels_limit() -> None:
    import subprocess

    from detkit.serve.limits import max_pixels_arg

    assert max_pixels_arg(["--max-pixels", "7"]) == 7 and max_pixels_arg(["--max-pixels=8"]) == 8
    assert max_pixels_arg(["--port", "0"]) == 25_000_000 and max_pixels_arg(["--max-pixels", "x"]) == 25_000_000
    script = _OPENCV_LIMIT.replace("sys.argv_path", repr(str(ROOT / "tools" / "serve.py")))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    env, status, message = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert env == "5000" and status == "413" and "more pixels than its 100x100 header" in message, out.stdout


def test_uvicorn_limits_follow_the_queue() -> None:
    from detkit.serve.server import connection_limits
    from detkit.serve.settings import ServeOptions

    limits = connection_limits(ServeOptions(config="c.yaml", queue_size=10, max_batch=4))
    assert limits["limit_concurrency"] == 10 + 4 + 16 and limits["timeout_keep_alive"] == 5


def test_warmup_sizes_are_parsed_or_refused_in_one_line() -> None:
    from detkit.serve.settings import parse_sizes

    assert parse_sizes(["480x640", "720X1280"], "--warmup") == ((480, 640), (720, 1280))
    for bad in ("480", "0x640", "ax640", "480x640x3"):
        with pytest.raises(UsageError, match=f"--warmup {bad}: not a size; give HEIGHTxWIDTH"):
            parse_sizes([bad], "--warmup")
    with pytest.raises(UsageError, match="--warmup"):
        ServeOptions(config="c.yaml", warmup=((0, 5),)).validate()
