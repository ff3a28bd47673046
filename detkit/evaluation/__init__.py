"""Evaluation: COCO detection / segmentation metrics and classification accuracy."""

from .classification import ClassificationMeter, topk_accuracy, topk_correct
from .coco_eval import SUMMARY_KEYS, COCOEvaluator, format_coco_table, format_per_class_table

__all__ = [
    "COCOEvaluator",
    "SUMMARY_KEYS",
    "format_coco_table",
    "format_per_class_table",
    "topk_accuracy",
    "topk_correct",
    "ClassificationMeter",
]
