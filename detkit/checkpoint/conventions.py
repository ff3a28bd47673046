"""Input conventions of weight files, and the check that a config feeds a file the input it was trained on.

A network trained on ``(x[c] - mean[c]) / std[c]`` of images in one channel order gives poor results, silently,
on images normalized another way. The conventions in use:

=========================================  =========  ==========================  ===========================
source                                     channels   mean (0-255 scale)          std
=========================================  =========  ==========================  ===========================
torchvision (every ImageNet and COCO file)  RGB       123.675, 116.28, 103.53     58.395, 57.12, 57.375
Detectron2's MSRA ImageNet ResNets          BGR       103.53, 116.28, 123.675     1, 1, 1
(Caffe2; ``ImageNetPretrained/MSRA``)
FAIR's X-101-32x8d                          BGR       103.53, 116.28, 123.675     57.375, 57.12, 58.395
a Detectron2 file's ``pixel_mean`` /        the order  as stated                  as stated
``pixel_std`` entries                       its mean
                                            implies
=========================================  =========  ==========================  ===========================

:func:`check_input_convention` compares one of these with a config (a detector's ``model.input_format``,
``model.pixel_mean``, ``model.pixel_std``; a classifier's ``input.mean``, ``input.std``, always RGB) and
refuses a mismatch in one line that names both conventions and the keys to set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .files import CheckpointError

__all__ = ["FAIR_X101", "MSRA", "TORCHVISION", "InputConvention", "check_input_convention", "convention_from_file"]

_IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)


@dataclass(frozen=True)
class InputConvention:
    """How a network expects its input: ``(x[c] - mean[c]) / std[c]``, ``x`` on the 0..255 scale.

    Attributes:
        channels: ``"RGB"`` or ``"BGR"``: the order of ``x``'s channels (and of ``mean``/``std``); None when
            the source does not say (then mean and std are compared as they are).
        mean: 3 floats, in ``channels`` order.
        std: 3 floats, in ``channels`` order; all 1 for Caffe-style networks (mean subtracted only).
        source: who says so, for messages, e.g. ``"torchvision's ImageNet normalization"``.
    """

    channels: Optional[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def describe(self) -> str:
        """E.g. ``"BGR, 0-255 minus mean [103.53, 116.28, 123.675] (std 1)"``."""
        mean = ", ".join(f"{v:g}" for v in self.mean)
        order = f"{self.channels}, " if self.channels else ""
        if all(abs(s - 1.0) < 1e-6 for s in self.std):
            return f"{order}0-255 minus mean [{mean}] (std 1)"
        return f"{order}mean [{mean}], std [{', '.join(f'{v:g}' for v in self.std)}] (0-255 scale)"


TORCHVISION = InputConvention("RGB", _IMAGENET_MEAN_RGB, (58.395, 57.12, 57.375),
                              "torchvision's ImageNet normalization")
MSRA = InputConvention("BGR", _IMAGENET_MEAN_RGB[::-1], (1.0, 1.0, 1.0),
                       "Detectron2's MSRA ImageNet models (Caffe2: BGR, 0-255, mean subtracted only)")
FAIR_X101 = InputConvention("BGR", _IMAGENET_MEAN_RGB[::-1], (57.375, 57.12, 58.395),
                            "FAIR's X-101-32x8d ImageNet model (BGR, Detectron2's X101 configs)")


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 0.01 + 1e-3 * abs(float(y)) for x, y in zip(a, b))


def convention_from_file(settings: Mapping[str, Any], source: str) -> Optional[InputConvention]:
    """The convention a file states in its ``pixel_mean`` / ``pixel_std`` entries (Detectron2's files), or None.

    The channel order follows from the mean when it is ImageNet's in one of the two orders (Detectron2
    writes its means in the order of its ``INPUT.FORMAT``); otherwise it stays None.
    """
    if "pixel_mean" not in settings or "pixel_std" not in settings:
        return None
    try:
        mean = tuple(float(v) for v in _flat(settings["pixel_mean"]))
        std = tuple(float(v) for v in _flat(settings["pixel_std"]))
    except (TypeError, ValueError):
        return None
    if len(mean) != 3 or len(std) != 3:
        return None
    channels = "RGB" if _close(mean, _IMAGENET_MEAN_RGB) else "BGR" if _close(mean, _IMAGENET_MEAN_RGB[::-1]) else None
    return InputConvention(channels, mean, std,  # type: ignore[arg-type]
                           f"the pixel_mean/pixel_std stored in {source}")


def _flat(value: Any) -> list[float]:
    if hasattr(value, "reshape") and hasattr(value, "tolist"):
        return list(value.reshape(-1).tolist())
    return list(value)


@dataclass(frozen=True)
class ConfigInput:
    """What a config feeds the network, and the keys that set it (for messages)."""

    convention: InputConvention
    keys: tuple[str, str, Optional[str]]  # mean key, std key, channel-order key (None: RGB only)


def config_input(cfg: Any) -> Optional[ConfigInput]:
    """The input a detection or classification config gives its network; None for other objects."""
    model = getattr(cfg, "model", None)
    if model is not None and hasattr(model, "input_format") and hasattr(model, "pixel_mean"):
        conv = InputConvention(model.input_format, tuple(model.pixel_mean), tuple(model.pixel_std), "the config")
        return ConfigInput(conv, ("model.pixel_mean", "model.pixel_std", "model.input_format"))
    inp = getattr(cfg, "input", None)
    if inp is not None and hasattr(inp, "mean") and hasattr(inp, "std"):
        return ConfigInput(InputConvention("RGB", tuple(inp.mean), tuple(inp.std), "the config"),
                           ("input.mean", "input.std", None))
    return None


def check_input_convention(convention: Optional[InputConvention], cfg: Any, key: str, source: str) -> None:
    """Refuse weights whose input convention differs from what ``cfg`` feeds the network.

    Args:
        convention: the weights' convention (None: unknown, nothing to check).
        cfg: a :class:`~detkit.config.schema.DetectionConfig` or ``ClassificationConfig``.
        key: the config key or argument that named the weights (for the message).
        source: the file or name (for the message).

    Raises:
        CheckpointError: one line with both conventions and the keys and values that make them agree.
    """
    given = config_input(cfg)
    if convention is None or given is None:
        return
    have = given.convention
    mean_key, std_key, order_key = given.keys
    channels_differ = convention.channels is not None and convention.channels != have.channels
    if not channels_differ and _close(have.mean, convention.mean) and _close(have.std, convention.std):
        return
    fix = [f"{mean_key}=[{','.join(f'{v:g}' for v in convention.mean)}]",
           f"{std_key}=[{','.join(f'{v:g}' for v in convention.std)}]"]
    if convention.channels is not None:
        if order_key is None and convention.channels != "RGB":
            raise CheckpointError(
                f"{key}: {source} expects {convention.describe()} ({convention.source}), but this config feeds "
                f"{have.describe()} and a classifier reads RGB only: use weights trained on RGB input"
            )
        if order_key is not None:
            fix.insert(0, f"{order_key}={convention.channels}")
    raise CheckpointError(
        f"{key}: {source} expects {convention.describe()} ({convention.source}), but the config feeds "
        f"{have.describe()}: the results would be silently poor; set {' '.join(fix)} (or use a config made for "
        "these weights)"
    )
