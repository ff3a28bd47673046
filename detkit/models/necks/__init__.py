"""Necks: the feature pyramid network."""

from .fpn import FPN, BackboneWithFPN

__all__ = ["FPN", "BackboneWithFPN"]
