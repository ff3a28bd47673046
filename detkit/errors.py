"""The one base class of detkit's expected errors.

A :class:`DetkitError` means bad input (a config key, a data file, an image, a checkpoint, a
command-line value): its message is one line that names the file, key or value and says what to
do. :func:`detkit.cli.run_cli` prints it as ``<tool>: error: <message>`` and exits with 2;
anything else is a bug and keeps its traceback (see :mod:`detkit.cli`).

The subclasses also derive from the built-in type that fits (``ValueError``, ``OSError``,
``RuntimeError``) so existing ``except ValueError`` code keeps working. This module imports
nothing from detkit, so every layer may use it.
"""

from __future__ import annotations

__all__ = ["DetkitError", "UsageError"]


class DetkitError(Exception):
    """Bad input; the message is one line saying what to fix."""


class UsageError(DetkitError, ValueError):
    """A command-line argument is wrong (``--device cuda`` without CUDA, ``--num 0``, ...)."""
