"""Run setup shared by the command-line tools: arguments, output folder, logging, seeding."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config, save_config
from .distributed import get_rank, is_main_process

__all__ = [
    "setup_output_dir",
    "setup_logging",
    "seed_everything",
]

_HANDLER_TAG = "_detkit_handler"


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through tqdm so the progress bar stays intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(output_dir: Optional[str | Path] = None, name: str = "detkit") -> logging.Logger:
    """Configure the ``detkit`` logger: console (rank 0 at INFO, others at WARNING) and ``log.txt``.

    Calling it again replaces the handlers installed by a previous call.
    """
    log = logging.getLogger(name)
    for h in [h for h in log.handlers if getattr(h, _HANDLER_TAG, False)]:
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    rank = get_rank()
    fmt = logging.Formatter(
        f"[%(asctime)s{'' if rank == 0 else f' rank{rank}'}] %(message)s", datefmt="%m/%d %H:%M:%S"
    )
    console = _TqdmHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    setattr(console, _HANDLER_TAG, True)
    log.addHandler(console)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / "log.txt", encoding="utf-8")
        fh.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
        setattr(fh, _HANDLER_TAG, True)
        log.addHandler(fh)
    return log


def setup_output_dir(cfg: Config, output_dir: Optional[str | Path] = None, config_name: str = "config.yaml",
                     default_subdir: str = "") -> Path:
    """Create the output folder, write the resolved config (rank 0; its ``output_dir`` set to the
    folder) and start logging to ``log.txt``.

    Returns the folder: ``output_dir`` if given, else ``cfg.output_dir`` (joined with
    ``default_subdir`` when set, e.g. ``"eval"`` so an evaluation run on a training folder's
    ``config.yaml`` writes beside, not over, the training's ``metrics.json``).
    """
    if output_dir is not None:
        out = Path(output_dir)
    else:
        out = Path(cfg.output_dir) / default_subdir if default_subdir else Path(cfg.output_dir)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        # the saved config points at the folder it is in (``--config OUT/config.yaml --resume`` continues there)
        save_config(cfg.model_copy(update={"output_dir": str(out)}), out / config_name)
    setup_logging(out)
    logging.getLogger("detkit").info("Output folder: %s", out.resolve())
    return out


def seed_everything(seed: int, deterministic: bool = False, rank_offset: bool = True) -> int:
    """Seed python, numpy and torch (all devices); returns the seed used by this process.

    With ``rank_offset`` each process gets ``seed + rank`` so augmentations differ between
    processes. ``deterministic`` asks torch for deterministic kernels (slower).
    """
    s = int(seed) + (get_rank() if rank_offset else 0)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return s
