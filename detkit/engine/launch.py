"""Run setup shared by the command-line tools: arguments, output folder, logging, seeding, clean errors."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..config import Config, ConfigError, save_config
from .distributed import barrier, destroy_distributed, get_rank, is_main_process

__all__ = [
    "default_argument_parser",
    "setup_output_dir",
    "setup_logging",
    "seed_everything",
    "user_errors",
    "run_cli",
]

_HANDLER_TAG = "_detkit_handler"


def default_argument_parser(description: Optional[str], weights: bool = False, resume: bool = True,
                            default_subdir: str = "") -> argparse.ArgumentParser:
    """``--config CONFIG [--output-dir DIR] [--resume] [--weights W] [key=value ...]``.

    ``description`` is shown verbatim (:class:`argparse.RawDescriptionHelpFormatter`), so a tool
    passes its whole module docstring and the examples in it keep their lines and indentation.
    ``default_subdir`` only documents where the output goes without ``--output-dir``
    (``setup_output_dir(..., default_subdir=...)`` must be given the same value).
    """
    p = argparse.ArgumentParser(description=(description or "").strip() or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    where = f"<output_dir of the config>/{default_subdir}" if default_subdir else "output_dir of the config"
    p.add_argument("--output-dir", default=None, help=f"output folder (default: {where})")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pth")
    if weights:
        p.add_argument("--weights", required=True, help="checkpoint or weights file to evaluate")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_iters=100")
    return p


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


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input" and get a one-line message instead of a traceback."""
    types: list[type[BaseException]] = [ConfigError, FloatingPointError]
    candidates = [
        ("detkit.data.coco", "DatasetError"),
        ("detkit.data", "DatasetError"),
        ("detkit.data.images", "ImageReadError"),
        ("detkit.data", "ImageReadError"),
        ("detkit.checkpoint", "CheckpointError"),
    ]
    import importlib

    for module, name in candidates:
        try:
            t = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(t, type) and issubclass(t, BaseException) and t not in types:
            types.append(t)
    return tuple(types)


def run_cli(main: Callable[[Optional[Sequence[str]]], int | None], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)``; expected user errors print ``error: <message>`` on one line and return 2.

    Other exceptions keep their traceback. The process group is torn down either way.
    """
    expected = user_errors()
    try:
        rc = main(argv)
        # every rank leaves together: a rank that tears down its process group while another is
        # still writing checkpoints or reports can abort in the backend's teardown
        barrier()
        return int(rc or 0)
    except expected as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        prefix = "" if get_rank() == 0 else f"[rank {get_rank()}] "
        print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)
        for h in logging.getLogger("detkit").handlers:  # keep the reason in log.txt too
            if isinstance(h, logging.FileHandler):
                h.handle(logging.makeLogRecord({"name": "detkit", "levelno": logging.ERROR,
                                                "levelname": "ERROR", "msg": f"error: {msg}"}))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        destroy_distributed()
