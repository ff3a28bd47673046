"""Building blocks shared by all detkit models: norms and conv blocks."""

from .batch_norm import NORM_NAMES, FrozenBatchNorm2d, get_norm
from .conv import ConvNormAct, fold_frozen_bn

__all__ = ["NORM_NAMES", "FrozenBatchNorm2d", "get_norm", "ConvNormAct", "fold_frozen_bn"]
