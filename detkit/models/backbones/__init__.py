"""Backbones: ResNet family with named outputs res2..res5."""

from .resnet import ARCHS, ResNet, build_resnet, convert_torchvision_resnet

__all__ = ["ARCHS", "ResNet", "build_resnet", "convert_torchvision_resnet"]
