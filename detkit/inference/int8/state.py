"""What int8 calibration computed (:class:`Int8State`), and its saved form.

Saved form (:func:`save_quantized` / :func:`load_quantized`): the observers' statistics (histograms,
min/max) of the backbone graph and of the RPN and box head graphs, and a fingerprint of the fp32 weights they
belong to, in a ``torch.save`` file read back with ``torch.load(weights_only=True)`` (tensors,
strings, numbers and dicts only: no code, no pickled classes), plus a ``manifest.json``. Loading
re-exports the model given to the Predictor, checks the fingerprint, loads the statistics and
converts: the int8 weights are recomputed from the same fp32 weights, so a reload gives the same
detections bit for bit. (``torch.export.save``/``load`` were not used: ``torch.export.load``
unpickles its weights and constants with ``weights_only=False``.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ...errors import DetkitError
from ...fileio import atomic_write, write_text_atomic

#: /2: the RPN and box heads' statistics too; /1 (backbone + FPN only) files are refused with what to do
FORMAT = "detkit-int8-observers/2"
_OLD_FORMATS = ("detkit-int8-observers/1",)
_FILE, _MANIFEST = "int8_observers.pt", "manifest.json"


class QuantizationError(DetkitError, ValueError):
    """An int8 file or input is unusable; the message names the file and what to do."""


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, dtypes and values), 16 hex digits."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class Int8State:
    """What calibration computed: the observers' state and the weights it belongs to.

    Attributes:
        observers: ``activation_post_process_*`` buffers of the prepared backbone graph, by
            ``"<observed node>.<buffer>"``.
        fingerprint: :func:`weights_fingerprint` of the fp32 backbone, RPN head and box head (before BN folding).
        meta: JSON-able facts (images, seconds, versions, ``rpn_head_input``: the dtype the RPN
            head graph was calibrated with) for the manifest.
        source: the file it was read from, or ``"calibration"``.
        rpn_head: the same for the RPN head graph (:class:`~detkit.inference.int8.rpn_head.Int8RPNHead`);
            empty when the model's head is not quantized.
        box_head: the same for the box head graph (:class:`~detkit.inference.int8.box_head.Int8BoxHead`).
    """

    observers: dict[str, Tensor]
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "calibration"
    rpn_head: dict[str, Tensor] = field(default_factory=dict)
    box_head: dict[str, Tensor] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import torchao

    return {"torch": torch.__version__, "torchao": getattr(torchao, "__version__", "?")}


def save_quantized(state: Int8State, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> Path:
    """Write ``path/int8_observers.pt`` (tensors and strings only) and ``path/manifest.json``; returns the file.

    Each file is written atomically (:func:`detkit.fileio.atomic_write`): an interrupted write leaves the
    previous file or none, never a truncated one. The ``.pt`` file, which alone is loaded, is written first.
    """
    out = Path(path)
    meta = {**state.meta, **_versions(), **(extra or {})}
    with atomic_write(out / _FILE, binary=True) as f:
        torch.save({"format": FORMAT, "fingerprint": state.fingerprint, "observers": state.observers,
                    "rpn_head_observers": state.rpn_head, "box_head_observers": state.box_head,
                    "meta": json.dumps(meta, default=str)}, f)
    manifest = {"format": FORMAT, "file": _FILE, "fingerprint": state.fingerprint,
                "observer_tensors": len(state.observers), "rpn_head_observer_tensors": len(state.rpn_head),
                "box_head_observer_tensors": len(state.box_head), **meta}
    write_text_atomic(out / _MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return out / _FILE


def load_quantized(path: Union[str, os.PathLike], fingerprint: Optional[str] = None) -> Int8State:
    """Read what :func:`save_quantized` wrote (a folder or its ``int8_observers.pt``) safely
    (``weights_only=True``); ``fingerprint``: that of the weights in use, checked against the file's."""
    p = Path(path)
    file = p / _FILE if p.is_dir() else p
    if not file.is_file():
        raise QuantizationError(f"int8: quantized file {file} not found; write it with tools/quantize.py")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line naming it
        raise QuantizationError(f"int8: cannot read {file} ({type(e).__name__}); write it again with "
                                "tools/quantize.py") from None
    if isinstance(data, dict) and data.get("format") in _OLD_FORMATS:
        raise QuantizationError(f"int8: {file} has format {data['format']} (no statistics for the RPN head, "
                                "which int8 now quantizes too); write it again with tools/quantize.py")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("observers"), dict):
        raise QuantizationError(f"int8: {file} is not a detkit int8 file (format {FORMAT})")
    if fingerprint is not None and data.get("fingerprint") != fingerprint:
        raise QuantizationError(f"int8: {file} was calibrated for other weights (fingerprint "
                                f"{data.get('fingerprint')}, these are {fingerprint}); quantize these weights")
    return Int8State(dict(data["observers"]), str(data["fingerprint"]), json.loads(data.get("meta") or "{}"),
                     str(file), dict(data.get("rpn_head_observers") or {}), dict(data.get("box_head_observers") or {}))
