"""Configs of tiny random-weight detectors shared by the inference tests (not a test module).

Import with ``from tiny_configs import TINY_MASK_RCNN`` (pytest puts ``tests/`` on ``sys.path``).
"""

#: Mask R-CNN R18-FPN with 32 FPN channels, 3 named classes, at most 3 detections per image,
#: test images resized to short side 96 / long side <= 128: fast enough to run many times per test.
TINY_MASK_RCNN = """\
model:
  meta_architecture: mask_rcnn
  num_classes: 3
  backbone: {name: resnet18, norm: BN, freeze_at: 0}
  fpn: {out_channels: 32}
  anchors: {sizes: [[16], [32], [64], [128], [256]]}
  rpn: {pre_nms_topk_test: 100, post_nms_topk_test: 30}
  roi_heads:
    detections_per_image: 3
    box_head: {fc_dim: 64}
    mask_head: {conv_dim: 16, num_conv: 1}
data:
  class_names: [circle, rectangle, triangle]
input: {min_size_test: 96, max_size_test: 128}
"""

#: Mask R-CNN R18-FPN (FrozenBN) with 32 FPN channels and 3 named classes, test images resized to
#: short side 96 / long side <= 160, as a dict (tests write it with their own weights and changes)
SMALL_MASK_RCNN = {
    "model": {
        "meta_architecture": "mask_rcnn",
        "backbone": {"name": "resnet18", "norm": "FrozenBN", "freeze_at": 2},
        "fpn": {"out_channels": 32},
        "rpn": {"pre_nms_topk_test": 200, "post_nms_topk_test": 50},
        "roi_heads": {"box_head": {"fc_dim": 64}, "mask_head": {"conv_dim": 32, "num_conv": 2}},
    },
    "data": {"class_names": ["cat", "dog", "bird"]},
    "input": {"min_size_test": 96, "max_size_test": 160},
}
