"""The one atomic file writer: a file is either the old one or the complete new one.

:func:`atomic_write` opens a temporary file in the destination folder; when the ``with`` block
ends without an exception the data is flushed, fsynced and renamed over the destination
(``os.replace``), and the folder entry is synced where the platform allows it. On any failure the
temporary file is removed and an existing destination is left untouched, so an interrupted run,
a full disk or a crash never leaves a half-written config, checkpoint or results file.

This module imports nothing from detkit, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

__all__ = ["atomic_write", "detkit_home", "write_text_atomic", "write_json_atomic"]

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_write(path: PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: text (UTF-8) or ``binary`` file object.

    Creates the parent folder. The destination appears only after the block completes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` written to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs))


def detkit_home() -> Path:
    """detkit's own folder for what it downloads and caches: ``$DETKIT_HOME``, default ``~/.cache/detkit``
    (``weights/``: weights by name; ``imagefolder/``: folder scans)."""
    home = os.environ.get("DETKIT_HOME", "").strip()
    return Path(home) if home else Path(os.path.expanduser("~")) / ".cache" / "detkit"
