"""Checkpoint I/O: atomic saving, safe loading, and format-aware weight loading.

* :func:`save_checkpoint` writes atomically (temp file in the same folder, fsync, rename).
* :func:`load_checkpoint` only ever uses ``torch.load(..., weights_only=True)``.
* :func:`load_weights` accepts detkit checkpoints and state dicts, torchvision
  classification and detection state dicts, converts their keys, aligns key
  prefixes with the target model (e.g. a classifier's ``backbone.*`` onto a
  detector's ``backbone.bottom_up.*``), loads what fits and returns a
  :class:`LoadReport` instead of failing deep inside ``load_state_dict``. From a detkit
  training checkpoint with an ``ema`` entry (``last.pth``, ``best.pth`` of a run with EMA)
  it loads the EMA weights, the ones the run's own evaluation scored.
* :func:`compare_state_dict` checks a state dict against a model key by key (strict, no
  conversion), e.g. before ``--resume``; :meth:`LoadReport.problems` says what does not fit.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "LoadReport",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "compare_state_dict",
]

PathLike = Union[str, "os.PathLike[str]"]

FMT_DETKIT = "detkit"
FMT_TV_CLS = "torchvision classification"
FMT_TV_DET = "torchvision detection"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message is one line."""


# --------------------------------------------------------------------------- save / load
def save_checkpoint(obj: dict, path: PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` atomically and return the path.

    The data goes to a temporary file in the destination folder, is flushed and
    fsynced, then renamed over ``path`` with ``os.replace``; a failure at any point
    leaves an existing ``path`` untouched and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: PathLike) -> dict:
    """Load a checkpoint file on CPU with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` (one line) if the file is missing, is not a torch
    file, is not a dict, or needs unsafe (arbitrary-code) unpickling, which is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported operand" in msg:
            raise CheckpointError(
                f"{path} is not a readable torch checkpoint (corrupt, truncated or another "
                "format); re-save it with torch.save"
            ) from None
        m = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        what = f" (it contains {m.group(1)})" if m else ""
        raise CheckpointError(
            f"{path} needs unsafe unpickling (torch.load weights_only=False, which can run "
            f"arbitrary code){what} and is refused; convert it by loading it once where you trust "
            "it and re-saving only tensors, e.g. torch.save({'model': model.state_dict()}, path)"
        ) from None
    except Exception as e:  # zip/magic/EOF errors from non-torch or truncated files
        detail = type(e).__name__
        if str(e).strip():
            detail += ": " + str(e).strip().splitlines()[0][:120]
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({detail}); re-save it with torch.save"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, expected a dict (a state dict or "
            "{'model': state_dict, ...}); re-save it as one"
        )
    return obj


# --------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        source_format: detected format, e.g. ``"torchvision classification"``.
        loaded: model keys that received checkpoint values.
        missing: model keys the checkpoint did not provide (they keep their init).
        unexpected: checkpoint keys inside modules the model has, but unknown to it.
        dropped: checkpoint keys of modules the model does not have (e.g. ``fc.*``
            when initializing a backbone), or outside the part of the checkpoint used.
        mismatched: ``(model key, checkpoint shape, model shape)`` for same-named
            tensors whose shapes differ; not loaded, the model keeps its initialization.
        source: file path, or ``"<state dict>"``.
        prefix_map: ``(checkpoint prefix, model prefix)`` used to align keys.
        weights: which weights of the source were used: ``"model"``, or ``"ema"`` for the
            EMA weights of a detkit training checkpoint (also said in ``source_format``).
    """

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    source: str = "<state dict>"
    prefix_map: tuple[str, str] = ("", "")
    weights: str = "model"

    @property
    def fits(self) -> bool:
        """True when every model tensor was loaded and the checkpoint had no unknown tensor."""
        return not (self.missing or self.mismatched or self.unexpected)

    def problems(self, max_items: int = 10, include: Sequence[str] = ("mismatched", "missing", "unexpected",
                                                                        "dropped")) -> str:
        """One line naming what does not fit: shape mismatches (with both shapes), model tensors missing
        from the checkpoint and checkpoint tensors the model does not have; each list shows its first
        ``max_items`` keys and "and N more". Empty when nothing in ``include`` is wrong."""

        def listed(items: list[str]) -> str:
            more = f", and {len(items) - max_items} more" if len(items) > max_items else ""
            return ", ".join(items[:max_items]) + more

        parts = []
        if "mismatched" in include and self.mismatched:
            parts.append(f"{len(self.mismatched)} tensor(s) differ in shape: " + listed(
                [f"{k} (checkpoint {tuple(cs)} vs model {tuple(ms)})" for k, cs, ms in self.mismatched]))
        if "missing" in include and self.missing:
            parts.append(f"{len(self.missing)} model tensor(s) missing from the checkpoint: {listed(self.missing)}")
        if "unexpected" in include and self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint tensor(s) unknown to the model: "
                         f"{listed(self.unexpected)}")
        if "dropped" in include and self.dropped:
            parts.append(f"{len(self.dropped)} checkpoint tensor(s) of modules the model does not have: "
                         f"{listed(self.dropped)}")
        return "; ".join(parts)

    def summary(self, max_items: int = 8) -> str:
        """Readable multi-line summary; long key lists are grouped by module."""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        src, dst = self.prefix_map
        lines = [
            f"loaded {len(self.loaded)}/{total} model tensors from {self.source} "
            f"(format: {self.source_format}; checkpoint prefix {src!r} -> model prefix {dst!r})"
        ]
        if self.mismatched:
            lines.append(f"  mismatched {len(self.mismatched)} (shapes differ; not loaded, these keep "
                         "their fresh initialization, i.e. are re-initialized):")
            for k, cs, ms in self.mismatched[:max_items]:
                lines.append(f"    {k}: checkpoint {tuple(cs)} vs model {tuple(ms)}")
            if len(self.mismatched) > max_items:
                lines.append(f"    ... and {len(self.mismatched) - max_items} more")
        for name, keys, note in (
            ("missing", self.missing, "not in the checkpoint; keep their initialization"),
            ("dropped", self.dropped, "modules the model does not have"),
            ("unexpected", self.unexpected, "unknown to the model's modules"),
        ):
            if keys:
                lines.append(f"  {name} {len(keys)} ({note}): {_group_keys(keys, max_items)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _group_keys(keys: list[str], max_items: int) -> str:
    if len(keys) <= max_items:
        return ", ".join(keys)
    for depth in (1, 2, 3):
        groups = Counter(".".join(k.split(".")[:depth]) for k in keys)
        if len(groups) > 1 or depth == 3:
            break
    parts = [f"{g}.* ({n})" for g, n in list(groups.items())[:max_items]]
    if len(groups) > max_items:
        parts.append(f"... {len(groups) - max_items} more groups")
    return ", ".join(parts)


# --------------------------------------------------------------------------- format detection
def _split_tensors(sd: Mapping[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, Tensor)}
    others = [str(k) for k in sd if k not in tensors]
    return tensors, others


def _ema_weights(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The EMA state dict of a detkit training checkpoint (``{"model": sd, "ema": {"model": sd, ...}}``)."""
    ema = obj.get("ema")
    if isinstance(obj.get("model"), Mapping) and isinstance(ema, Mapping) and isinstance(ema.get("model"), Mapping):
        if any(isinstance(v, Tensor) for v in ema["model"].values()):
            return ema["model"]
    return None


def _detect_and_convert(
    obj: Mapping[str, Any], source: str, prefer_ema: bool = True
) -> tuple[str, dict[str, Tensor], list[str], str]:
    """Return (format, detkit-named state dict, non-tensor keys, "model" or "ema")."""
    wrapper = ""
    used = "model"
    sd: Mapping[str, Any] = obj
    ema_sd = _ema_weights(obj) if prefer_ema else None
    if ema_sd is not None:
        sd, wrapper, used = ema_sd, "training checkpoint, EMA weights", "ema"
    else:
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                sd, wrapper = obj[key], "training checkpoint"
                break
    tensors, others = _split_tensors(sd)
    if not tensors:
        raise CheckpointError(
            f"{source} contains no tensors (top-level keys: {list(obj)[:8]}); expected a state "
            "dict or {'model': state_dict, ...}"
        )
    if all(k.startswith("module.") for k in tensors):  # saved from DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}

    if any(k.startswith("backbone.body.") for k in tensors):
        fmt = FMT_TV_DET
        try:
            from .models.torchvision_compat import convert_torchvision_detection
        except ImportError as e:
            raise CheckpointError(
                f"{source} is a torchvision detection state dict but its converter "
                f"(detkit.models.torchvision_compat) cannot be imported: {e}"
            ) from None
        tensors = convert_torchvision_detection(tensors)
    elif "conv1.weight" in tensors and any(k.startswith("layer1.") for k in tensors):
        from .models.backbones.resnet import convert_torchvision_resnet

        fmt = FMT_TV_CLS
        tensors = convert_torchvision_resnet(tensors)
    else:
        fmt = FMT_DETKIT
    if wrapper:
        fmt = f"{fmt} ({wrapper})"
    return fmt, tensors, others, used


# --------------------------------------------------------------------------- prefix alignment
_MAX_PREFIX_DEPTH = 4


def _prefixes(key: str) -> list[tuple[str, str]]:
    """``"a.b.c.d"`` -> [("", "a.b.c.d"), ("a.", "b.c.d"), ("a.b.", "c.d")].

    The remainder keeps at least two components (a bare ``weight`` says nothing about
    where a tensor belongs) and at most ``_MAX_PREFIX_DEPTH`` components are stripped.
    """
    parts = key.split(".")
    out = []
    for d in range(0, max(0, min(len(parts) - 2, _MAX_PREFIX_DEPTH)) + 1):
        out.append((".".join(parts[:d]) + ("." if d else ""), ".".join(parts[d:])))
    return out


def _best_prefix_pair(
    ckpt: Mapping[str, Tensor], model_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[str, str]:
    """The (checkpoint prefix, model prefix) swap that maps the most same-shaped tensors."""
    by_rest: dict[str, list[str]] = {}
    for mk in model_shapes:
        for pm, rest in _prefixes(mk):
            by_rest.setdefault(rest, []).append(pm)
    votes: Counter[tuple[str, str]] = Counter()
    for ck in ckpt:
        for pc, rest in _prefixes(ck):
            for pm in by_rest.get(rest, ()):
                votes[(pc, pm)] += 1
    if not votes:
        return ("", "")

    def score(pair: tuple[str, str]) -> tuple[int, int, int]:
        pc, pm = pair
        same_shape = sum(
            1
            for ck, v in ckpt.items()
            if ck.startswith(pc) and model_shapes.get(pm + ck[len(pc):]) == tuple(v.shape)
        )
        return (same_shape, votes[pair], -(len(pc) + len(pm)))

    candidates = [p for p, _ in votes.most_common(12)]
    return max(candidates, key=score)


# --------------------------------------------------------------------------- load_weights
def _is_step_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _check_projection_shortcuts(model: nn.Module, name: str, fmt: str) -> None:
    """torchvision's ResNets have option-B shortcuts: refuse a model built with option A or C."""
    for m in model.modules():
        option = getattr(m, "shortcut_option", "B")
        if option != "B":
            raise CheckpointError(
                f"{name} ({fmt}) has torchvision's projection shortcuts (option B: a 1x1 projection only where "
                f"the shape changes), but this model's ResNet uses shortcut option {option}, whose shortcut "
                f"weights differ; build it with shortcut B (model.backbone.shortcut=B / model.shortcut=B) to load it"
            )


def load_weights(
    model: nn.Module, source: Union[PathLike, Mapping[str, Any]], *, prefer_ema: bool = True
) -> LoadReport:
    """Load weights from a file or a dict into ``model`` and report what happened.

    ``source`` may be a detkit training checkpoint (``{"model": sd, ...}``), a detkit
    state dict, or a torchvision classification / detection state dict (also inside
    ``{"model": ...}``). A detkit training checkpoint of a run with EMA (``"ema":
    {"model": sd, ...}``) gives its EMA weights, which are what the run evaluated and
    scored, unless ``prefer_ema=False``; ``report.weights`` and ``report.source_format``
    say which were used (resuming training restores both, see
    :func:`detkit.engine.restore_training_state`). Keys are converted to detkit names, then one prefix swap
    aligning the checkpoint with the model is chosen automatically (most same-shaped
    matches), and remaining exact-name matches are also used. Same-named tensors with
    different shapes are not loaded (reported in ``mismatched``); ``model`` keeps its
    initialization for them. Raises :class:`CheckpointError` if nothing can be loaded.
    """
    if isinstance(source, Mapping):
        name, obj = "<state dict>", source
    else:
        name, obj = str(source), load_checkpoint(source)
    fmt, ckpt, non_tensor, used = _detect_and_convert(obj, name, prefer_ema)
    if fmt in (FMT_TV_CLS, FMT_TV_DET):
        _check_projection_shortcuts(model, name, fmt)

    model_sd = model.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in model_sd.items()}
    pc, pm = _best_prefix_pair(ckpt, model_shapes)
    # first components of model keys under the aligned root: the modules the model has there
    roots = {k[len(pm):].split(".")[0] for k in model_shapes if k.startswith(pm)}

    report = LoadReport(source_format=fmt, source=name, prefix_map=(pc, pm), weights=used)
    to_load: dict[str, Tensor] = {}
    taken: set[str] = set()
    leftovers: list[str] = []
    for ck, value in ckpt.items():
        target = pm + ck[len(pc):] if ck.startswith(pc) else None
        if target is None or target not in model_shapes:
            leftovers.append(ck)
            continue
        taken.add(target)
        if model_shapes[target] == tuple(value.shape):
            to_load[target] = value
        else:
            report.mismatched.append((target, tuple(value.shape), model_shapes[target]))
    for ck in leftovers:  # exact names outside the aligned part (e.g. a classifier's fc)
        value = ckpt[ck]
        if ck in model_shapes and ck not in taken:
            taken.add(ck)
            if model_shapes[ck] == tuple(value.shape):
                to_load[ck] = value
            else:
                report.mismatched.append((ck, tuple(value.shape), model_shapes[ck]))
        elif _is_step_counter(ck):
            continue  # BatchNorm step counters have no use in FrozenBatchNorm2d models
        elif ck.startswith(pc) and ck[len(pc):].split(".")[0] in roots:
            report.unexpected.append(ck)
        else:
            report.dropped.append(ck)
    report.unexpected.extend(non_tensor)
    report.loaded = sorted(to_load)
    report.missing = [k for k in model_shapes if k not in taken and not _is_step_counter(k)]

    if not to_load:
        hint = (f"; {len(report.mismatched)} same-named tensors differ in shape, e.g. "
                f"{report.mismatched[0][0]}" if report.mismatched else "")
        example = next(iter(ckpt))
        raise CheckpointError(
            f"no weights in {name} (format: {fmt}) fit the model: checkpoint keys like "
            f"{example!r} match none of its {len(model_shapes)} keys{hint}"
        )
    try:
        result = model.load_state_dict(to_load, strict=False)
    except RuntimeError as e:  # should not happen: names and shapes were checked
        raise CheckpointError(f"loading {name} failed: {str(e).splitlines()[0]}") from None
    assert not result.unexpected_keys, result.unexpected_keys
    return report


def compare_state_dict(model: nn.Module | Mapping[str, Tensor], state_dict: Mapping[str, Any],
                       source: str = "<state dict>") -> LoadReport:
    """What a strict ``model.load_state_dict(state_dict)`` would find, by exact key, without loading.

    ``loaded`` are the keys that fit, ``missing`` the model keys absent from ``state_dict``,
    ``unexpected`` its keys unknown to the model, ``mismatched`` same-named tensors of
    another shape. ``model`` may also be a state dict. Use :meth:`LoadReport.problems`
    for a one-line description when ``not report.fits``.
    """
    model_sd = model.state_dict() if isinstance(model, nn.Module) else model
    report = LoadReport(source_format=FMT_DETKIT, source=source)
    for k, v in model_sd.items():
        if k not in state_dict:
            report.missing.append(k)
            continue
        c = state_dict[k]
        cs = tuple(c.shape) if isinstance(c, Tensor) else ()
        if isinstance(c, Tensor) and cs == tuple(v.shape):
            report.loaded.append(k)
        else:
            report.mismatched.append((k, cs, tuple(v.shape)))
    report.unexpected = [str(k) for k in state_dict if k not in model_sd]
    return report
