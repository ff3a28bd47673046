"""Format-aware weight loading: :func:`load_weights` and :func:`compare_state_dict`.

* :func:`load_weights` accepts detkit checkpoints and state dicts and every format of
  :data:`FOREIGN_FORMATS` (each one module: :mod:`detkit.checkpoint.torchvision`,
  :mod:`detkit.checkpoint.detectron2`; a plain pickle such as a Detectron2 zoo ``.pkl`` is read by
  :func:`~detkit.checkpoint.detectron2.read_detectron2_pkl`, every other file by :func:`load_checkpoint`),
  converts their keys, aligns key prefixes with the target model (e.g. a classifier's
  ``backbone.*`` onto a detector's ``backbone.bottom_up.*``), loads what fits and returns a
  :class:`LoadReport` instead of failing deep inside ``load_state_dict``. From a detkit
  training checkpoint with an ``ema`` entry (``last.pth``, ``best.pth`` of a run with EMA)
  it loads the EMA weights, the ones the run's own evaluation scored.
* :func:`compare_state_dict` checks a state dict against a model key by key (strict, no
  conversion), e.g. before ``--resume``; :meth:`LoadReport.problems` says what does not fit.

Whether a partial fit is acceptable is not decided here: see :mod:`detkit.checkpoint.initial`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Union

from torch import Tensor, nn

from . import detectron2 as d2
from .caffe2 import CAFFE2
from .conventions import InputConvention
from . import torchvision as tv
from .base import ForeignFormat
from .files import CheckpointError, PathLike, load_checkpoint
from .hub import fetch_weights, is_weights_name, parse_weights_name
from .report import LoadReport

__all__ = ["FOREIGN_FORMATS", "FMT_DETKIT", "load_weights", "compare_state_dict"]

FMT_DETKIT = "detkit"

#: the foreign formats, tried in order; the first whose ``matches`` accepts the state dict converts it
FOREIGN_FORMATS: tuple[ForeignFormat, ...] = (tv.DETECTION_V2, tv.DETECTION, tv.CLASSIFICATION, d2.DETECTRON2, CAFFE2)


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


@dataclass
class _Converted:
    """What :func:`_detect_and_convert` found: the format's name, the foreign format (None for detkit's
    own), the detkit-named tensors, the non-tensor keys, the entries the format ignores (settings,
    not weights), which weights were used ("model" or "ema") and the input convention that the format
    or the file states (None: neither says)."""

    fmt: str
    foreign: ForeignFormat | None
    tensors: dict[str, Tensor]
    non_tensor: list[str]
    ignored: list[str]
    used: str
    convention: InputConvention | None = None


def _detect_and_convert(obj: Mapping[str, Any], source: str, prefer_ema: bool = True) -> _Converted:
    """Find the checkpoint's weights and format, and convert them to detkit names."""
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

    fmt, used_format, ignored, convention = FMT_DETKIT, None, [], None
    for candidate in FOREIGN_FORMATS:
        if candidate.matches(tensors):
            fmt, used_format = candidate.name, candidate
            if candidate.not_weights is not None:
                ignored = [k for k in tensors if candidate.not_weights(k)]
            if candidate.convention is not None:
                convention = candidate.convention(tensors, source)
            tensors = candidate.convert(tensors)
            break
    if wrapper:
        fmt = f"{fmt} ({wrapper})"
    return _Converted(fmt, used_format, tensors, others, ignored, used, convention)


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
    """Foreign ResNets have option-B shortcuts: refuse a model built with option A or C."""
    for m in model.modules():
        option = getattr(m, "shortcut_option", "B")
        if option != "B":
            raise CheckpointError(
                f"{name} ({fmt}) has projection shortcuts (option B: a 1x1 projection only where "
                f"the shape changes), but this model's ResNet uses shortcut option {option}, whose shortcut "
                f"weights differ; build it with shortcut B (model.backbone.shortcut=B / model.shortcut=B) to load it"
            )


def load_weights(
    model: nn.Module, source: Union[PathLike, Mapping[str, Any]], *, prefer_ema: bool = True
) -> LoadReport:
    """Load weights from a file or a dict into ``model`` and report what happened.

    ``source`` may be a detkit training checkpoint (``{"model": sd, ...}``), a detkit
    state dict, a torchvision classification / detection state dict (also inside
    ``{"model": ...}``), a Detectron2 model-zoo ``.pkl``, a Detectron2 ``model_final.pth``, a Caffe2 ImageNet
    ResNet (Detectron2's MSRA ``R-50.pkl``), or a name of one (``torchvision://<Enum>.<member>``,
    ``detectron2://<path>``, ``https://...``: :func:`detkit.checkpoint.hub.fetch_weights`). The input
    convention is checked by :func:`load_initial_weights`, which has the config; here it is only reported.
    A detkit training checkpoint of a run with EMA (``"ema": {"model": sd, ...}``) gives
    its EMA weights, which are what the run evaluated and scored, unless
    ``prefer_ema=False``; ``report.weights`` and ``report.source_format`` say which were used
    (resuming training restores both, see
    :func:`detkit.engine.restore_training_state`). Keys are converted to detkit names, then one prefix swap
    aligning the checkpoint with the model is chosen automatically (most same-shaped
    matches), and remaining exact-name matches are also used. Same-named tensors with
    different shapes are not loaded (reported in ``mismatched``); ``model`` keeps its
    initialization for them. Raises :class:`CheckpointError` if nothing can be loaded.
    """
    if isinstance(source, Mapping):
        name, obj = "<state dict>", source
    else:
        if is_weights_name(source):  # torchvision://..., detectron2://..., https://...: the cached file
            source = fetch_weights(parse_weights_name(str(source)))
        name = str(source)
        # a Detectron2 zoo .pkl: restricted unpickling, its "model" dict; else a torch file (weights_only)
        obj = d2.read_detectron2_pkl(source)["model"] if d2.is_pickle_file(source) else load_checkpoint(source)
    conv = _detect_and_convert(obj, name, prefer_ema)
    fmt, ckpt = conv.fmt, conv.tensors
    if conv.foreign is not None and conv.foreign.projection_shortcuts:
        _check_projection_shortcuts(model, name, fmt)

    model_sd = model.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in model_sd.items()}
    pc, pm = _best_prefix_pair(ckpt, model_shapes)
    # first components of model keys under the aligned root: the modules the model has there
    roots = {k[len(pm):].split(".")[0] for k in model_shapes if k.startswith(pm)}

    report = LoadReport(source_format=fmt, source=name, prefix_map=(pc, pm), weights=conv.used, ignored=conv.ignored,
                        input_convention=conv.convention)
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
    report.unexpected.extend(conv.non_tensor)
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
