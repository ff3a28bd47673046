"""RoI heads: Fast R-CNN box head, Mask R-CNN mask head, and the standard and Cascade R-CNN heads that chain them."""

from .box_head import FastRCNNConvFCHead, FastRCNNPredictor, fast_rcnn_inference, fast_rcnn_losses
from .cascade import CascadeROIHeads
from .mask_head import MaskRCNNHead, mask_rcnn_inference, mask_rcnn_loss, paste_masks_in_image
from .standard import SampledRoIs, StandardROIHeads

__all__ = [
    "CascadeROIHeads",
    "FastRCNNConvFCHead",
    "FastRCNNPredictor",
    "fast_rcnn_inference",
    "fast_rcnn_losses",
    "MaskRCNNHead",
    "mask_rcnn_inference",
    "mask_rcnn_loss",
    "paste_masks_in_image",
    "SampledRoIs",
    "StandardROIHeads",
]
