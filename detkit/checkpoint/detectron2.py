"""The Detectron2 checkpoint formats: model-zoo ``.pkl`` files and ``model_final.pth`` of its training.

* :func:`read_detectron2_pkl` reads a model-zoo file (a pickle of ``{"model": {name: numpy array},
  "__author__": ..., "matching_heuristics": ...}``) with a restricted unpickler: only the globals that
  numpy arrays and plain containers need are resolved (:data:`ALLOWED_GLOBALS`), object-dtype arrays
  are refused, and nothing in the file can run code. A Detectron2 training checkpoint
  (``model_final.pth``, ``torch.save({"model": state_dict, ...})``) is a torch file and is read by
  :func:`detkit.checkpoint.files.load_checkpoint` (``weights_only=True``); :func:`is_pickle_file`
  tells the two apart.
* :data:`DETECTRON2` recognizes Detectron2's key names and :func:`convert_detectron2` renames them to
  detkit's.

Key mapping (Faster / Mask R-CNN and Cascade (Mask) R-CNN with a ResNet-FPN backbone):

====================================================  ================================================
Detectron2                                            detkit
====================================================  ================================================
``backbone.bottom_up.stem.conv1.norm.*``              ``backbone.bottom_up.stem.bn1.*``
``backbone.bottom_up.res{s}.{i}.conv{k}.norm.*``      ``backbone.bottom_up.res{s}.{i}.bn{k}.*``
``backbone.bottom_up.res{s}.{i}.shortcut.weight``     ``backbone.bottom_up.res{s}.{i}.shortcut.conv.weight``
``backbone.fpn_lateral{n}`` / ``fpn_output{n}``       ``backbone.fpn.lateral_convs.{j}.conv`` / ``output_convs.{j}.conv``
                                                      (``j = n - lowest n``; ``.norm`` -> ``.norm``)
``proposal_generator.rpn_head.conv``                  ``rpn.head.convs.0`` (``conv.conv{k}`` -> ``convs.{k}``)
``proposal_generator.rpn_head.objectness_logits``     ``rpn.head.objectness``
``proposal_generator.rpn_head.anchor_deltas``         ``rpn.head.anchor_deltas``
``roi_heads.box_head.fc{k}``                          ``roi_heads.box_head.fcs.{k-1}``
``roi_heads.box_head.conv{k}`` (``.norm``)            ``roi_heads.box_head.convs.{k-1}.conv`` (``.norm``)
``roi_heads.box_predictor.cls_score`` / ``bbox_pred``  same names and values
``roi_heads.mask_head.mask_fcn{k}`` (``.norm``)       ``roi_heads.mask_head.convs.{k-1}.conv`` (``.norm``)
``roi_heads.mask_head.deconv`` / ``predictor``        same names and values
``roi_heads.box_head.{s}.fc{k}`` (Cascade stage s)    ``roi_heads.box_head.{s}.fcs.{k-1}``
``roi_heads.box_head.{s}.conv{k}`` (``.norm``)        ``roi_heads.box_head.{s}.convs.{k-1}.conv`` (``.norm``)
``roi_heads.box_predictor.{s}.cls_score`` / ``bbox_pred``  same names and values (class-agnostic: 4 rows)
``pixel_mean``, ``pixel_std``,                        not weights: left out (the config sets them; Detectron2
``proposal_generator.anchor_generator.cell_anchors.*``  itself no longer saves or loads them)
====================================================  ================================================

Class layers need no re-ordering: Detectron2, like detkit, puts the background logit last in
``cls_score`` (K+1 rows) and has no background rows in ``bbox_pred`` (4K) or the mask predictor (K),
so detkit label = Detectron2 label (contiguous ids in ascending COCO category id order).
"""

from __future__ import annotations

import functools
import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from .base import ForeignFormat
from .conventions import convention_from_file
from .files import CheckpointError, PathLike

__all__ = [
    "ALLOWED_GLOBALS",
    "DETECTRON2",
    "convert_detectron2",
    "is_pickle_file",
    "read_detectron2_pkl",
]

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]


# --------------------------------------------------------------------------- restricted unpickling
class _Refused(Exception):
    """Raised inside the unpickler; turned into a one-line :class:`CheckpointError`."""


class _ArrayTooLarge(_Refused):
    """An array header asks for more memory than its file could hold: a corrupt or crafted file."""


def _safe_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise _Refused(f"an object-dtype array (dtype {dtype.str!r}, whose elements are arbitrary Python objects)")
    return dtype


def _check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"an array whose dtype is a {type(dtype).__name__}")
    if dtype.hasobject:
        raise _Refused(f"an object-dtype array (dtype {dtype.str!r}, whose elements are arbitrary Python objects)")


class _NdarrayToken:
    """What ``numpy.ndarray`` resolves to: a pickle may only name it as the type for ``_reconstruct``;
    it cannot be called (``ndarray(shape, dtype, buffer, ...)`` would bypass the dtype check)."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("a call of the global numpy.ndarray")


_NDARRAY = _NdarrayToken()


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any, max_bytes: Optional[int] = None) -> np.ndarray:
    # numpy's pickle reduce: an empty array of `subtype` (numpy writes shape (0,)), filled by
    # ndarray.__setstate__ afterwards; a crafted pickle could ask for any shape here, and numpy would
    # allocate it, so the array may not be larger than the file it comes from (``max_bytes``)
    if subtype is not _NDARRAY:
        raise _Refused(f"an array of type {getattr(subtype, '__name__', type(subtype).__name__)}")
    dims = shape if isinstance(shape, tuple) else (shape,)
    if max_bytes is not None:
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise _Refused(f"an array of shape {shape!r}")
        nbytes = math.prod(dims) * np.dtype(dtype).itemsize
        if nbytes > max_bytes:
            raise _ArrayTooLarge(f"an array of shape {tuple(dims)} ({nbytes} bytes) larger than the whole file "
                                 f"({max_bytes} bytes)")
    return _np_multiarray._reconstruct(np.ndarray, shape, dtype)


def _safe_scalar(dtype: Any, *data: Any) -> Any:
    _check_dtype(dtype)
    return _np_multiarray.scalar(dtype, *data)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # pickle protocol 5 arrays: raw bytes + dtype + shape
    _check_dtype(dtype)
    return _np_numeric._frombuffer(buf, dtype, shape, order)


def _safe_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise _Refused("_codecs.encode with other arguments than (str, 'latin1')")
    return text.encode("latin1")


def _safe_empty_bytes(*args: Any) -> bytes:
    # protocol-2 pickles store b"" as bytes() (e.g. the data of an empty array)
    if args:
        raise _Refused("bytes() with arguments")
    return b""


#: ``(module, name)`` -> what the restricted unpickler resolves it to; every other global is refused.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _safe_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _safe_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _safe_frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,  # type: ignore[dict-item]
    ("numpy", "dtype"): _safe_dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _safe_encode,
    **{(m, "bytes"): _safe_empty_bytes for m in ("builtins", "__builtin__")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; persistent ids are refused by ``pickle`` itself. Arrays may
    not be larger than ``max_bytes`` (the file's size: a real array's data is in the file)."""

    def __init__(self, file: Any, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.max_bytes = int(max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"the global {module}.{name}")
        if found is _safe_reconstruct:
            return functools.partial(_safe_reconstruct, max_bytes=self.max_bytes)
        return found


_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) format starts with a pickled magic number (protocol 2, LONG1)
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def is_pickle_file(path: PathLike) -> bool:
    """True when ``path`` is a plain pickle (a Detectron2 zoo file), not a torch file.

    A zip archive (``torch.save``'s format, whatever its extension) is never one; a ``.pkl`` /
    ``.pickle`` file is, and so is any file that starts like a pickle (protocol >= 2) but not
    like torch's legacy format. False for missing files.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_TORCH_LEGACY_MAGIC))
    except OSError:
        return False
    if head.startswith(_ZIP_MAGIC) or head.startswith(_TORCH_LEGACY_MAGIC):
        return False
    return path.suffix.lower() in (".pkl", ".pickle") or head.startswith(b"\x80")


def _walk_arrays(obj: Any, depth: int = 0):
    """Every numpy array inside ``obj`` (dicts, lists, tuples)."""
    if depth > 32:
        return
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _walk_arrays(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk_arrays(v, depth + 1)


def _to_tensor(a: np.ndarray) -> Tensor | np.ndarray:
    """A numeric array as a CPU tensor (its own memory when the array's is read-only or foreign-endian)."""
    if a.dtype.kind not in "biufc":
        return a  # strings, dates, ...: left as they are, then reported as non-tensor entries
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, order="C", copy=True)
    return torch.from_numpy(a)


def read_detectron2_pkl(path: PathLike) -> dict[str, Any]:
    """Read a Detectron2 model-zoo ``.pkl`` safely.

    Args:
        path: e.g. ``model_final_f10217.pkl``.

    Returns:
        the file's dict, e.g. ``{"model": {name: Tensor}, "__author__": "Detectron2 Model Zoo"}``, with
        every numeric numpy array under ``"model"`` turned into a CPU tensor of the same dtype and
        shape (Detectron2's key names; :func:`convert_detectron2` renames them).

    Raises:
        CheckpointError: one line naming the file and what to do, when it is missing or unreadable,
            needs any global outside :data:`ALLOWED_GLOBALS` (the message names the global), holds an
            object-dtype array, or is neither a Detectron2 zoo file nor a Caffe2 ``{"blobs": ...}`` file
            (whose blobs are returned as ``"model"``, with ``"__author__": "Caffe2"``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, path.stat().st_size, encoding="latin1").load()
    except _ArrayTooLarge as e:
        raise CheckpointError(f"{path} is corrupt: it declares {e}; download the file again") from None
    except _Refused as e:
        raise CheckpointError(
            f"{path} needs {e} to unpickle, which is refused (a Detectron2 zoo .pkl holds only numpy arrays "
            "in plain containers; anything else could run code): use the file from the Detectron2 model zoo, "
            "or load it once where you trust it and re-save only arrays"
        ) from None
    except Exception as e:  # truncated / corrupt / not a pickle
        detail = type(e).__name__ + (": " + str(e).strip().splitlines()[0][:120] if str(e).strip() else "")
        raise CheckpointError(
            f"{path} is not a readable pickle ({detail}); download the Detectron2 model-zoo file again"
        ) from None
    for a in _walk_arrays(data):  # belt and braces: _safe_dtype refuses them while unpickling
        if a.dtype.hasobject:
            raise CheckpointError(f"{path} holds an object-dtype array, which is refused; re-save it with numeric arrays")
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(data).__name__}, not a Detectron2 model-zoo file (a dict with 'model': "
            "{name: array}); use a Detectron2 zoo .pkl or a torch checkpoint"
        )
    model = data.get("model")
    if not isinstance(model, Mapping) and isinstance(data.get("blobs"), Mapping):
        # a Caffe2 / Detectron (v1) file, e.g. ImageNetPretrained/MSRA/R-50.pkl: its blobs are the weights
        # (Caffe2 names, converted by detkit.checkpoint.caffe2)
        model = data["blobs"]
        data = {"model": model, "__author__": "Caffe2"}
    if not isinstance(model, Mapping):
        keys = [str(k) for k in list(data)[:6]]
        raise CheckpointError(
            f"{path} is a pickle without 'model' or 'blobs' (top-level keys: {keys}), not a Detectron2 model-zoo "
            "file ({'model': {name: array}, '__author__': ...}) or a Caffe2 ImageNet file ({'blobs': ...}); "
            "load it where it was made and save torch.save({'model': model.state_dict()}, 'model.pth')"
        )
    out = dict(data)
    out["model"] = {k: _to_tensor(v) if isinstance(v, np.ndarray) else v for k, v in model.items()}
    return out


# --------------------------------------------------------------------------- key conversion
_RESNET_PREFIX = r"^((?:backbone\.(?:bottom_up\.)?)?)"
_STEM = re.compile(_RESNET_PREFIX + r"stem\.conv1\.(?:norm\.)?" + r"(.+)$")
_BLOCK = re.compile(_RESNET_PREFIX + r"(res[2-5]\.\d+)\.(conv\d|shortcut)\.(norm\.)?(.+)$")
_FPN = re.compile(r"^backbone\.fpn_(lateral|output)(\d)\.(norm\.)?(.+)$")
_RPN_CONV = re.compile(r"^proposal_generator\.rpn_head\.conv\.(?:conv(\d+)\.)?(weight|bias)$")
# the box head's stage index ``{s}.`` is there for Cascade R-CNN only
_HEAD_CONV = re.compile(r"^roi_heads\.(box_head\.(?:\d+\.)?conv|mask_head\.mask_fcn)(\d+)\.(norm\.)?(.+)$")
_BOX_FC = re.compile(r"^roi_heads\.box_head\.(\d+\.)?fc(\d+)\.(weight|bias)$")
_NOT_WEIGHTS = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$")
_RENAMED = {
    "proposal_generator.rpn_head.objectness_logits.": "rpn.head.objectness.",
    "proposal_generator.rpn_head.anchor_deltas.": "rpn.head.anchor_deltas.",
}


def _resnet_name(key: str) -> str | None:
    """A Detectron2 ResNet key as detkit's, or None when it is not one."""
    if m := _STEM.match(key):
        prefix, leaf = m.groups()
        is_norm = ".norm." in key
        return f"{prefix}stem.{'bn1' if is_norm else 'conv1'}.{leaf}"
    if m := _BLOCK.match(key):
        prefix, block, layer, norm, leaf = m.groups()
        if layer == "shortcut":
            return f"{prefix}{block}.shortcut.{'norm' if norm else 'conv'}.{leaf}"
        return f"{prefix}{block}.{('bn' + layer[4:]) if norm else layer}.{leaf}"
    return None


def convert_detectron2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Detectron2 (Cascade) Faster / Mask R-CNN ResNet-FPN state dict (or a ResNet's) to detkit keys.

    Args:
        state_dict: Detectron2 names, e.g. the ``"model"`` of :func:`read_detectron2_pkl` or of a
            ``model_final.pth``.

    Returns:
        a new dict with detkit :class:`TwoStageDetector` keys (values are not copied). ``pixel_mean``,
        ``pixel_std`` and the anchor generator's ``cell_anchors`` are left out (config, not weights).
        Keys it does not know pass through unchanged, so :func:`detkit.load_weights` reports them.
    """
    fpn_levels = [int(m.group(2)) for k in state_dict if (m := _FPN.match(k))]
    lowest = min(fpn_levels) if fpn_levels else 2
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _NOT_WEIGHTS.match(key):
            continue
        new = _resnet_name(key)
        if new is not None:
            pass
        elif m := _FPN.match(key):
            kind, level, norm, leaf = m.groups()
            target = "lateral_convs" if kind == "lateral" else "output_convs"
            new = f"backbone.fpn.{target}.{int(level) - lowest}.{'norm' if norm else 'conv'}.{leaf}"
        elif m := _RPN_CONV.match(key):
            idx, leaf = m.groups()
            new = f"rpn.head.convs.{int(idx or 0)}.{leaf}"
        elif m := _HEAD_CONV.match(key):
            head, idx, norm, leaf = m.groups()
            head = head.rsplit(".", 1)[0]  # "box_head", "box_head.{s}" or "mask_head"
            new = f"roi_heads.{head}.convs.{int(idx) - 1}.{'norm' if norm else 'conv'}.{leaf}"
        elif m := _BOX_FC.match(key):
            stage, idx, leaf = m.groups()
            new = f"roi_heads.box_head.{stage or ''}fcs.{int(idx) - 1}.{leaf}"
        else:
            new = key
            for old_prefix, new_prefix in _RENAMED.items():
                if key.startswith(old_prefix):
                    new = new_prefix + key[len(old_prefix):]
                    break
        out[new] = value
    return out


_SIGNATURE = re.compile(
    r"^(proposal_generator\.|backbone\.fpn_(lateral|output)\d\.)"
    r"|(^|\.)(stem\.conv1\.norm\.|res[2-5]\.\d+\.conv\d\.norm\.)"
)


def _is_detectron2(state_dict: Mapping[str, Tensor]) -> bool:
    # detkit (stem.bn1, bn{k}, shortcut.norm) and torchvision (bn{k}, downsample.1) never use these names
    return any(_SIGNATURE.search(k) for k in state_dict)


#: Detectron2 state dicts: model-zoo ``.pkl`` files (via :func:`read_detectron2_pkl`) and ``model_final.pth``
DETECTRON2 = ForeignFormat("Detectron2", _is_detectron2, convert_detectron2,
                           not_weights=lambda key: _NOT_WEIGHTS.match(key) is not None,
                           convention=convention_from_file)
