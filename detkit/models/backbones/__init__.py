"""Backbones: ResNet family with named outputs res2..res5, and the paper's CIFAR ResNets."""

from .cifar_resnet import CIFAR_DEPTHS, CifarResNet, build_cifar_resnet
from .resnet import ARCHS, SHORTCUTS, PadShortcut, ResNet, build_resnet

__all__ = ["ARCHS", "CIFAR_DEPTHS", "SHORTCUTS", "CifarResNet", "PadShortcut", "ResNet", "build_cifar_resnet", "build_resnet"]
