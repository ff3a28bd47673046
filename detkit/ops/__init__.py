"""Low-level tensor operators (torch/torchvision only; no other detkit imports)."""

from .roi_align import roi_align, roi_align_plan_stats
from .roi_align_nhwc import roi_align_nhwc

__all__ = ["roi_align", "roi_align_nhwc", "roi_align_plan_stats"]
