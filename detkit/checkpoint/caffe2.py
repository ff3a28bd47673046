"""The Caffe2 (Detectron v1) ImageNet ResNets that Detectron2's configs start from.

Detectron2's ``ImageNetPretrained/MSRA/R-50.pkl``, ``R-101.pkl`` and ``FAIR/X-101-32x8d.pkl`` are pickles of
``{"blobs": {caffe2 name: numpy array}, ...}`` (:func:`detkit.checkpoint.detectron2.read_detectron2_pkl` reads
them with the same restricted unpickler as the zoo files). Their networks take BGR images on the 0-255 scale
(:data:`detkit.checkpoint.conventions.MSRA`) and each BatchNorm was folded into a frozen affine
(``_bn_s`` scale, ``_bn_b`` shift, no running statistics).

Names, following Detectron2's own renaming of Caffe2 blobs (``_`` separates the parts):

============================================  ==============================================
Caffe2                                        detkit ResNet
============================================  ==============================================
``conv1_w``                                   ``stem.conv1.weight``
``res_conv1_bn_{s,b,rm,riv}``                 ``stem.bn1.{weight,bias,running_mean,running_var}``
``res{s}_{i}_branch2{a,b,c}_w``               ``res{s}.{i}.conv{1,2,3}.weight``
``res{s}_{i}_branch2{a,b,c}_bn_{s,b,...}``    ``res{s}.{i}.bn{1,2,3}.{weight,bias,...}``
``res{s}_{i}_branch1_w`` / ``_bn_*``          ``res{s}.{i}.shortcut.conv.weight`` / ``shortcut.norm.*``
``fc1000_{w,b}``, ``pred_{w,b}``              ``fc.{weight,bias}`` (the classifier: dropped by a detector)
``*_momentum``                                solver state: ignored, listed in the load report
============================================  ==============================================

A norm with a scale and a shift but no running statistics gets ``running_mean`` 0 and ``running_var`` 1, which
is what Detectron2's ``FrozenBatchNorm2d`` assumes for these files: ``y = x * s / sqrt(1 + eps) + b``. Any other
blob keeps its Caffe2 name, so the load report names it instead of dropping it silently.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from .base import ForeignFormat

__all__ = ["CAFFE2", "convert_caffe2"]

_STEM_CONV = re.compile(r"^conv1_(w|b)$")
_STEM_NORM = re.compile(r"^res_conv1_(bn|gn)_(s|b|rm|riv)$")
_BLOCK = re.compile(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(?:(bn|gn)_)?(s|b|w|rm|riv)$")
_FC = re.compile(r"^(?:fc1000|pred)_(w|b)$")
_NORM_LEAF = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_CONV_LEAF = {"w": "weight", "b": "bias"}
_BRANCH = {"2a": 1, "2b": 2, "2c": 3}


def _is_momentum(key: str) -> bool:
    return key.endswith("_momentum")


def _detkit_name(key: str) -> str | None:
    if m := _STEM_CONV.match(key):
        return f"stem.conv1.{_CONV_LEAF[m.group(1)]}"
    if m := _STEM_NORM.match(key):
        return f"stem.bn1.{_NORM_LEAF[m.group(2)]}"
    if m := _BLOCK.match(key):
        stage, index, branch, norm, leaf = m.groups()
        block = f"res{stage}.{index}"
        if norm:
            if leaf not in _NORM_LEAF:
                return None
            module = "shortcut.norm" if branch == "1" else f"bn{_BRANCH[branch]}"
            return f"{block}.{module}.{_NORM_LEAF[leaf]}"
        if leaf not in _CONV_LEAF:
            return None
        module = "shortcut.conv" if branch == "1" else f"conv{_BRANCH[branch]}"
        return f"{block}.{module}.{_CONV_LEAF[leaf]}"
    if m := _FC.match(key):
        return f"fc.{_CONV_LEAF[m.group(1)]}"
    return None


def convert_caffe2(blobs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename Caffe2 ResNet blobs to detkit's ResNet keys (see the module doc).

    Args:
        blobs: Caffe2 names -> tensors, e.g. the ``"model"`` of :func:`read_detectron2_pkl` on ``R-50.pkl``.

    Returns:
        detkit names (``stem.*``, ``res{s}.{i}.*``, ``fc.*``), with zero means and unit variances added to norms
        that have none; ``*_momentum`` left out; unknown blobs under their own names.
    """
    out: dict[str, Tensor] = {}
    for key, value in blobs.items():
        if _is_momentum(key):
            continue
        out[_detkit_name(key) or key] = value
    for key in [k for k in out if k.endswith(".weight") and (".bn" in k or ".norm." in k)]:
        module = key[: -len("weight")]
        n = out[key].shape[0]
        out.setdefault(module + "running_mean", torch.zeros(n, dtype=out[key].dtype))
        out.setdefault(module + "running_var", torch.ones(n, dtype=out[key].dtype))
    return out


def _is_caffe2(state_dict: Mapping[str, Tensor]) -> bool:
    return any(_STEM_NORM.match(k) or _BLOCK.match(k) for k in state_dict)


#: Caffe2 / Detectron (v1) ImageNet ResNets (``{"blobs": ...}`` pickles), e.g. Detectron2's MSRA R-50.pkl
CAFFE2 = ForeignFormat("Caffe2 ImageNet ResNet", _is_caffe2, convert_caffe2, not_weights=_is_momentum)
