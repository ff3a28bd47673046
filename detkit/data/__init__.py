"""detkit's data layer: image decoding, COCO reading/validation, augmentation, batching,
samplers, ImageFolder classification data and the synthetic shapes datasets.

Imports only :mod:`detkit.structures` and :mod:`detkit.config` from the rest of detkit.
"""

from .coco import CocoData, CocoSet, DatasetError, ImageRecord, load_coco
from .records import RecordTable
from .coco_dataset import CocoDetection, decode_segmentation
from .collate import ClassificationSample, DetectionSample, SkippedSample, collate_classification, collate_detection
from .imagefolder import ImageFolderDataset, check_class_sets
from .images import IMAGE_EXTENSIONS, ImageReadError, image_size, read_image
from .samplers import (
    AspectRatioGroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    build_detection_test_loader,
    build_detection_train_loader,
)
from .synthetic import SHAPE_CLASSES, make_shapes_coco, make_shapes_imagefolder
from .transforms import (
    DetectionTransform,
    build_classification_transform,
    build_detection_transform,
    resize_shortest_edge,
)

__all__ = [
    "AspectRatioGroupedBatchSampler",
    "ClassificationSample",
    "CocoData",
    "CocoDetection",
    "CocoSet",
    "DatasetError",
    "DetectionSample",
    "DetectionTransform",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageReadError",
    "ImageRecord",
    "RecordTable",
    "InferenceSampler",
    "SHAPE_CLASSES",
    "SkippedSample",
    "TrainingSampler",
    "build_classification_transform",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "build_detection_transform",
    "check_class_sets",
    "collate_classification",
    "collate_detection",
    "decode_segmentation",
    "image_size",
    "load_coco",
    "make_shapes_coco",
    "make_shapes_imagefolder",
    "read_image",
    "resize_shortest_edge",
]
