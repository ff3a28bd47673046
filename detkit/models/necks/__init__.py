"""Necks: the feature pyramid network."""

from .fpn import FPN, BackboneWithFPN, convert_torchvision_fpn

__all__ = ["FPN", "BackboneWithFPN", "convert_torchvision_fpn"]
