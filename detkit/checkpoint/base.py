"""The contract of a foreign checkpoint format (one module per format, e.g. :mod:`.torchvision`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from torch import Tensor

from .conventions import InputConvention

__all__ = ["ForeignFormat"]


@dataclass(frozen=True)
class ForeignFormat:
    """How to recognize and convert one foreign state-dict layout to detkit key names.

    Attributes:
        name: shown in reports and messages, e.g. ``"torchvision detection"``.
        matches: ``state_dict -> bool``; True when the (tensor-only, ``module.``-stripped)
            state dict is in this format.
        convert: ``state_dict -> state_dict`` with detkit names (and detkit's class order);
            keys it does not know pass through unchanged so that they are reported, not lost.
        projection_shortcuts: its ResNets use option-B shortcuts (a projection only where the
            shape changes); a detkit model built with option A or C is refused.
        not_weights: ``key -> bool``; True for the format's entries that are settings, not weights
            (e.g. Detectron2's ``pixel_mean``): ``convert`` leaves them out and the load report
            lists them as ``ignored``. None: every entry is a weight.
        convention: ``(state_dict, source) -> InputConvention | None``: the input normalization the
            format's networks expect (torchvision's are all the same), or that the file states in its
            settings (a Detectron2 file's ``pixel_mean``/``pixel_std``); None: the format does not say.
    """

    name: str
    matches: Callable[[Mapping[str, Tensor]], bool]
    convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    projection_shortcuts: bool = True
    not_weights: Optional[Callable[[str], bool]] = None
    convention: Optional[Callable[[Mapping[str, Tensor], str], Optional[InputConvention]]] = None
