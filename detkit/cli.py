"""The one command-line wrapper of every ``tools/*.py`` script, with one exit-code convention.

``sys.exit(run_cli(main, prog="train_det.py"))`` calls ``main(argv)`` and returns:

* ``0`` (or what ``main`` returns) on success;
* ``2`` on bad input: a :class:`~detkit.errors.DetkitError` (config, data, image, checkpoint,
  export, command-line value), a ``ValueError`` or ``OSError`` (a value or file the user gave), or
  a ``FloatingPointError`` (training diverged). One line goes to stderr,
  ``<prog>: error: <message>`` (the same as argparse's own usage errors, which also exit 2), and
  to the run's ``log.txt`` when one is open;
* ``130`` when interrupted (Ctrl-C);
* anything else is a bug: it propagates with its traceback (exit 1).

Under ``torchrun`` every rank leaves through a barrier and the process group is torn down.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

from .errors import DetkitError

__all__ = ["USER_ERRORS", "default_argument_parser", "error_line", "run_cli"]

#: exception types that mean "bad input": one line and exit code 2 instead of a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (DetkitError, ValueError, OSError, FloatingPointError)


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
        p.add_argument("--weights", required=True, help="checkpoint or weights file to evaluate, or a name: "
                       "torchvision://..., detectron2://..., https://...")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_iters=100")
    return p


def error_line(e: BaseException) -> str:
    """The message of ``e`` on one line (whitespace and newlines collapsed)."""
    return " ".join(str(e).split()) or type(e).__name__


def _log_to_files(text: str) -> None:
    """Keep ``text`` in the run's ``log.txt`` too (the console already shows the error line)."""
    for h in logging.getLogger("detkit").handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(logging.makeLogRecord({"name": "detkit", "levelno": logging.ERROR,
                                            "levelname": "ERROR", "msg": text}))


def _distributed() -> Optional[Any]:
    """``torch.distributed`` when a process group is up (only then is there anything to tear down).

    Looked up without importing torch, so ``--help`` and argument errors stay fast."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    return 0 if _distributed() is None else _engine_distributed().get_rank()


def _engine_distributed() -> Any:
    from .engine import distributed  # loaded already whenever a process group is up

    return distributed


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
            prog: Optional[str] = None, keep_freed_memory: bool = False) -> int:
    """Run ``main(argv)`` with the exit-code convention of the module doc; ``prog`` prefixes the error line.

    ``keep_freed_memory``: first tune this process's malloc for repeated inference
    (:func:`detkit.machine.keep_freed_memory`, process-wide, so the tools that own their process
    opt in here and the library never does it behind its users' backs).
    """
    try:
        if keep_freed_memory:
            from .machine import keep_freed_memory as tune_malloc

            tune_malloc()
        rc = main(argv)
        if _distributed() is not None:
            # every rank leaves together: a rank that tears down its process group while another is
            # still writing checkpoints or reports can abort in the backend's teardown
            _engine_distributed().barrier()
        return int(rc or 0)
    except USER_ERRORS as e:
        msg = error_line(e)
        rank = f"[rank {_rank()}] " if _rank() != 0 else ""
        print(f"{rank}{prog + ': ' if prog else ''}error: {msg}", file=sys.stderr, flush=True)
        detail = "" if isinstance(e, DetkitError) else "\n" + "".join(traceback.format_exception(e)).rstrip()
        _log_to_files(f"error: {msg}{detail}")
        return 2
    except KeyboardInterrupt:
        print(f"{prog + ': ' if prog else ''}interrupted", file=sys.stderr)
        return 130
    finally:
        if _distributed() is not None:
            _engine_distributed().destroy_distributed()
