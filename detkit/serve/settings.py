"""The settings of a detection server (the flags of ``tools/serve.py``) and the predictor it serves.

:class:`ServeOptions` holds every setting; :meth:`ServeOptions.validate` turns a bad value into a
one-line :class:`~detkit.errors.UsageError` naming the flag; :func:`build_predictor` loads the
config (with ``key=value`` overrides) and the weights into a :class:`~detkit.inference.predictor.Predictor`
whose ``test.batch_size`` is ``max_batch``, so a micro-batch runs as ONE forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..checkpoint import is_weights_name
from ..config import load_detection_config
from ..errors import UsageError
from ..machine import resolve_device
from ..inference.predictor import PRECISIONS, Predictor

__all__ = ["SERVE_MODULES", "ServeOptions", "build_predictor", "check_serve_extra", "parse_sizes"]

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    """Settings of one server.

    Attributes:
        config: YAML config of the model (None when the app is built around a ready predictor;
            only shown by ``GET /v1/model``).
        weights: checkpoint or state dict file; None: the config's ``model.weights``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16``, ``fp16`` (GPUs) or ``int8``; None: the config's ``test.precision``.
        host, port: where to listen (port 0: any free port).
        max_batch: most images in one forward pass (1: no batching).
        max_wait_ms: how long a batch waits for more images after its first one.
        queue_size: most images waiting for the model; one more is answered 503.
        max_bytes: largest accepted image file (413 above).
        max_pixels: largest accepted width x height, read from the file header before decoding
            (413 above: a decompression bomb guard).
        overrides: ``key=value`` config overrides.
        warmup: ``(height, width)`` image sizes predicted once before the server says it is ready
            (``GET /readyz``): first calls pay one-time costs (int8 compiles one graph per size bucket,
            for seconds to a minute), which would otherwise block the worker on live requests.
    """

    config: Optional[str] = None
    weights: Optional[str] = None
    device: str = "cpu"
    precision: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 4
    max_wait_ms: float = 10.0
    queue_size: int = 16
    max_bytes: int = 20 * MB
    max_pixels: int = 25_000_000
    overrides: Sequence[str] = ()
    warmup: Sequence[tuple[int, int]] = ()

    def validate(self) -> "ServeOptions":
        """Raise a one-line :class:`UsageError` naming the flag of the first bad value; return self."""
        checks = [
            (self.max_batch >= 1, "--max-batch", self.max_batch, "use 1 (no batching) or more"),
            (math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0, "--max-wait-ms", self.max_wait_ms,
             "use 0 or more milliseconds"),
            (self.queue_size >= 1, "--queue-size", self.queue_size, "use 1 or more"),
            (self.max_bytes >= 1, "--max-bytes", self.max_bytes, "use a positive number of bytes"),
            (self.max_pixels >= 1, "--max-pixels", self.max_pixels, "use a positive number of pixels"),
            (0 <= self.port <= 65535, "--port", self.port, "use 0..65535 (0: any free port)"),
            (self.precision is None or self.precision in PRECISIONS, "--precision", self.precision,
             f"use one of {', '.join(PRECISIONS)}"),
            (all(h >= 1 and w >= 1 for h, w in self.warmup), "--warmup",
             ",".join(f"{h}x{w}" for h, w in self.warmup), "give sizes as HEIGHTxWIDTH, e.g. 480x640"),
        ]
        for ok, flag, value, fix in checks:
            if not ok:
                raise UsageError(f"{flag} {value}: out of range; {fix}")
        return self


def parse_sizes(values: Sequence[str], flag: str) -> tuple[tuple[int, int], ...]:
    """``["480x640", ...]`` -> ``((480, 640), ...)`` (height x width); a one-line :class:`UsageError` naming
    ``flag`` for anything else."""
    sizes = []
    for v in values:
        parts = v.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UsageError(f"{flag} {v}: not a size; give HEIGHTxWIDTH in pixels, e.g. 480x640")
        sizes.append((int(parts[0]), int(parts[1])))
    return tuple(sizes)


def build_predictor(opts: ServeOptions) -> Predictor:
    """The :class:`Predictor` of ``opts.config`` (+ overrides) and ``opts.weights`` on ``opts.device``.

    ``test.batch_size`` is set to ``opts.max_batch`` (after the overrides) so that
    :meth:`Predictor.predict` runs a whole micro-batch in one forward pass.
    """
    if not opts.config:
        raise UsageError("--config is required: pass the YAML config of the model (e.g. runs/mine/config.yaml)")
    overrides = [*opts.overrides, f"test.batch_size={opts.max_batch}"]
    cfg = load_detection_config(opts.config, overrides, tool="serve.py")
    if opts.weights is not None and not is_weights_name(opts.weights) and not Path(opts.weights).is_file():
        raise UsageError(f"--weights {opts.weights}: no such file; pass a checkpoint such as "
                         "runs/x/checkpoints/best.pth")
    resolve_device(opts.device)
    return Predictor(cfg, weights=opts.weights, device=opts.device, precision=opts.precision)


#: modules of the ``serve`` extra and the distribution that provides each
SERVE_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def check_serve_extra() -> None:
    """Raise a one-line :class:`UsageError` when a package of the ``serve`` extra is missing."""
    import importlib.util

    missing = []
    for module, dist in SERVE_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found and module == "python_multipart":  # releases before 0.0.13 are only importable as multipart
            try:
                found = importlib.util.find_spec("multipart") is not None
            except (ImportError, ValueError):
                found = False
        if not found:
            missing.append(dist)
    if missing:
        raise UsageError(f"the server needs {', '.join(missing)}, which is not installed: "
                         "pip install -e '.[serve]'")
