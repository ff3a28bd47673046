"""detkit: Faster and Mask R-CNN on ResNet-FPN.

Public API: :class:`Predictor`, :func:`load_weights`, :func:`load_config`.
Heavy submodules are imported lazily so ``import detkit`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "load_weights", "load_config", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from .inference.predictor import Predictor

        return Predictor
    if name == "load_weights":
        from .checkpoint import load_weights

        return load_weights
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'detkit' has no attribute {name!r}")
