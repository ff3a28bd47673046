"""OpenCV's own pixel limit for decoding, set from ``--max-pixels`` before OpenCV is loaded.

The server checks an upload's width x height in its header (PIL) before decoding; OpenCV then decodes
with a limit of its own (``OPENCV_IO_MAX_IMAGE_PIXELS``, 2^30 pixels by default), which it reads once,
when the library loads. :func:`limit_opencv_pixels` sets it to the server's limit so the decoder
refuses what the header check would (a file whose header and pixel data disagree included).
``tools/serve.py`` calls it first thing, before anything imports ``cv2``. This module imports nothing
from detkit.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

__all__ = ["OPENCV_ENV", "DEFAULT_MAX_PIXELS", "max_pixels_arg", "limit_opencv_pixels"]

OPENCV_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 25_000_000


def max_pixels_arg(argv: Sequence[str], default: int = DEFAULT_MAX_PIXELS) -> int:
    """The value of ``--max-pixels N`` / ``--max-pixels=N`` in ``argv`` (``default`` when absent or not a
    number: the argument parser reports a bad value later)."""
    value = None
    for i, a in enumerate(argv):
        if a == "--max-pixels" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--max-pixels="):
            value = a.split("=", 1)[1]
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def limit_opencv_pixels(max_pixels: int) -> bool:
    """Set OpenCV's decoding limit to ``max_pixels``; True when it takes effect (``cv2`` not loaded yet)."""
    if "cv2" in sys.modules:
        logging.getLogger("detkit").warning(
            "OpenCV is already loaded: its decoding limit stays %s pixels (the header check still applies)",
            os.environ.get(OPENCV_ENV, "2^30"))
        return False
    os.environ[OPENCV_ENV] = str(max(int(max_pixels), 1))
    return True
