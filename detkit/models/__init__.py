"""detkit models. Builders are re-exported here; submodules are imported on demand."""

from .classifier import build_classifier
from .build import build_detector

__all__ = ["build_classifier", "build_detector"]
