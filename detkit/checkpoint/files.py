"""Checkpoint files: atomic saving and safe loading (no format knowledge here).

* :func:`save_checkpoint` writes with :func:`detkit.fileio.atomic_write` (temporary file in the
  same folder, fsync, rename), so a crash never leaves a half-written checkpoint.
* :func:`load_checkpoint` only ever uses ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Union

import torch

from ..errors import DetkitError
from ..fileio import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(DetkitError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message is one line."""


def save_checkpoint(obj: dict, path: PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` atomically and return the path.

    A failure at any point leaves an existing ``path`` untouched and removes the temporary file.
    """
    with atomic_write(path, binary=True) as f:
        torch.save(obj, f)
    return Path(path)


def load_checkpoint(path: PathLike) -> dict:
    """Load a checkpoint file on CPU with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` (one line) if the file is missing, is not a torch
    file, is not a dict, or needs unsafe (arbitrary-code) unpickling, which is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported operand" in msg:
            raise CheckpointError(
                f"{path} is not a readable torch checkpoint (corrupt, truncated or another "
                "format); re-save it with torch.save"
            ) from None
        m = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        what = f" (it contains {m.group(1)})" if m else ""
        raise CheckpointError(
            f"{path} needs unsafe unpickling (torch.load weights_only=False, which can run "
            f"arbitrary code){what} and is refused; convert it by loading it once where you trust "
            "it and re-saving only tensors, e.g. torch.save({'model': model.state_dict()}, path)"
        ) from None
    except Exception as e:  # zip/magic/EOF errors from non-torch or truncated files
        detail = type(e).__name__
        if str(e).strip():
            detail += ": " + str(e).strip().splitlines()[0][:120]
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({detail}); re-save it with torch.save"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, expected a dict (a state dict or "
            "{'model': state_dict, ...}); re-save it as one"
        )
    return obj
