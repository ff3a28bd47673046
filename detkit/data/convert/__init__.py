"""Convert Pascal VOC XML, YOLO txt and LabelMe JSON datasets to the COCO JSON that detkit trains on.

One small reader per format (:mod:`.voc`, :mod:`.yolo`, :mod:`.labelme`) turns the source files
into :class:`~.common.SourceDataset` records; :mod:`.common` checks the geometry, counts the
skipped entries, writes COCO (categories 1..K, bbox ``[x, y, w, h]`` in pixels, polygon
segmentations, ``iscrowd``) and splits train/val by image; :func:`convert_dataset` runs it all
for ``tools/convert_dataset.py``.
"""

from .common import Problems, SourceDataset, SourceImage, SourceObject, build_coco, split_coco
from .labelme import read_labelme
from .run import FORMATS, ConvertOptions, ConvertReport, convert_dataset, output_paths
from .voc import read_voc
from .yolo import read_yolo

__all__ = [
    "FORMATS",
    "ConvertOptions",
    "ConvertReport",
    "Problems",
    "SourceDataset",
    "SourceImage",
    "SourceObject",
    "build_coco",
    "convert_dataset",
    "output_paths",
    "read_labelme",
    "read_voc",
    "read_yolo",
    "split_coco",
]
