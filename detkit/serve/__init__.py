"""A detkit model behind HTTP, with micro-batching: what ``tools/serve.py`` runs.

* :mod:`detkit.serve.settings`: :class:`ServeOptions` (the flags) and :func:`build_predictor`;
* :mod:`detkit.serve.decode`: uploaded bytes -> RGB image, size guards before decoding;
* :mod:`detkit.serve.batcher`: :class:`MicroBatcher`, one worker thread running batched predictions;
* :mod:`detkit.serve.app`: :func:`create_app`, the FastAPI routes (needs the ``serve`` extra);
* :mod:`detkit.serve.server`: :func:`serve`, uvicorn on a bound socket.

FastAPI and uvicorn are imported only by ``app`` and ``server`` (``pip install -e ".[serve]"``), so
``import detkit.serve`` and the other modules work without them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeOptions", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "ServeOptions":
        from .settings import ServeOptions

        return ServeOptions
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'detkit.serve' has no attribute {name!r}")
