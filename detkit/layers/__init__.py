"""Building blocks shared by all detkit models: norms, conv blocks, fp32 islands under autocast."""

from .batch_norm import NORM_NAMES, FrozenBatchNorm2d, get_norm
from .conv import ConvNormAct, fold_frozen_bn
from .precision import fp32_forward

__all__ = ["NORM_NAMES", "FrozenBatchNorm2d", "get_norm", "ConvNormAct", "fold_frozen_bn", "fp32_forward"]
