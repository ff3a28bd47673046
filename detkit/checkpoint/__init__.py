"""Checkpoints and weights.

* :mod:`.files`: atomic :func:`save_checkpoint`, safe :func:`load_checkpoint` (``weights_only=True``).
* :mod:`.loading`: :func:`load_weights` (any known format, key conversion, prefix alignment,
  a :class:`LoadReport`) and :func:`compare_state_dict`.
* :mod:`.initial`: :func:`load_initial_weights`, the one way tools and :class:`Predictor` load a
  config's weights, with one rule on partial fits (:func:`check_fit`).
* one module per foreign format: :mod:`.torchvision`, :mod:`.detectron2` (with the restricted
  :func:`read_detectron2_pkl` for its model-zoo ``.pkl`` files), :mod:`.caffe2` (Detectron2's MSRA ImageNet
  ResNets).
* :mod:`.hub`: weights by name (``torchvision://``, ``detectron2://``, ``http(s)://``), downloaded into a
  verified cache; :mod:`.conventions`: the input normalization weights expect, checked against the config.

``detkit.models`` never imports this package: models are built first, then loaded.
"""

from .detectron2 import read_detectron2_pkl
from .files import CheckpointError, load_checkpoint, save_checkpoint
from .hub import is_weights_name
from .initial import check_fit, load_initial_weights
from .loading import FOREIGN_FORMATS, compare_state_dict, load_weights
from .report import LoadReport

__all__ = [
    "FOREIGN_FORMATS",
    "CheckpointError",
    "LoadReport",
    "check_fit",
    "compare_state_dict",
    "is_weights_name",
    "load_checkpoint",
    "load_initial_weights",
    "load_weights",
    "read_detectron2_pkl",
    "save_checkpoint",
]
