"""What loading weights did: :class:`LoadReport`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .conventions import InputConvention

__all__ = ["LoadReport"]


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
        ignored: checkpoint entries that its format says are settings, not weights (Detectron2's
            ``pixel_mean``, ``pixel_std``, ``cell_anchors``: the config sets them); not loaded.
        source: file path, or ``"<state dict>"``.
        prefix_map: ``(checkpoint prefix, model prefix)`` used to align keys.
        weights: which weights of the source were used: ``"model"``, or ``"ema"`` for the
            EMA weights of a detkit training checkpoint (also said in ``source_format``).
        input_convention: the input normalization the source's format or the file itself states (torchvision's
            files, a Detectron2 file's ``pixel_mean``/``pixel_std``); None when neither says.
    """

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source: str = "<state dict>"
    prefix_map: tuple[str, str] = ("", "")
    weights: str = "model"
    input_convention: Optional[InputConvention] = None

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
            ("ignored", self.ignored, "settings, not weights; the config sets them"),
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
