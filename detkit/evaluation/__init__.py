"""Evaluation: COCO detection / segmentation metrics, COCO result records, classification accuracy."""

from .classification import ClassificationMeter, topk_accuracy, topk_correct
from .coco_eval import SUMMARY_KEYS, COCOEvaluator, format_coco_table, format_per_class_table
from .results import detections_to_coco, encode_masks

__all__ = [
    "COCOEvaluator",
    "SUMMARY_KEYS",
    "format_coco_table",
    "format_per_class_table",
    "detections_to_coco",
    "encode_masks",
    "topk_accuracy",
    "topk_correct",
    "ClassificationMeter",
]
