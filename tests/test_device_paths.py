"""The CUDA path's device and dtype discipline, checked on a CPU-only machine.

On a GPU, a tensor that model code creates without ``device=`` lands on the CPU, and mixing it with
CUDA tensors fails (or, for a 0-dim one, costs a host-device copy). On a CPU-only machine the same
mistake is invisible, because everything is on the CPU. These tests make it visible: they run the
detectors with ``torch.set_default_device("meta")``, so any tensor created without an explicit device
lands on ``meta`` and the first op that mixes it with the model's CPU tensors raises. CPU-only
kernels that a GPU run never reaches (detkit's CPU RoIAlign) are swapped for the operator a GPU run
uses (torchvision's), as ``detkit.ops.roi_align`` does off the CPU.

fp16 autocast (the GPU's ``train.amp=fp16``, with a GradScaler) runs here on the CPU's autocast,
which applies the same casting rules: a dtype mismatch in the losses, the mask targets or the
box/mask post-processing raises here as it would on the GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

from detkit.config import load_config
from detkit.models.build import build_detector
from detkit.models.detector import rescale_detections
from detkit.structures import Targets

CONFIGS = {
    "faster": "configs/coco/faster_rcnn_R_18_FPN_1x.yaml",
    "mask": "configs/coco/mask_rcnn_R_18_FPN_1x.yaml",
    "cascade": "configs/coco/cascade_mask_rcnn_R_50_FPN_1x.yaml",
}
SMALL = ["model.backbone.name=resnet18", "model.backbone.norm=BN", "model.backbone.freeze_at=0",
         "model.fpn.out_channels=32", "model.roi_heads.box_head.fc_dim=64", "model.roi_heads.batch_size_per_image=64",
         "model.roi_heads.mask_head.conv_dim=16", "model.roi_heads.mask_head.num_conv=1"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _batch() -> tuple[list[torch.Tensor], list[Targets]]:
    """A landscape and a portrait uint8 image (padded into one batch), two objects each, with masks."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for h, w in ((96, 128), (128, 96)):
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        boxes = torch.tensor([[10.0, 12.0, 60.0, 80.0], [30.0, 40.0, 90.0, 90.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append(Targets(boxes, torch.tensor([0, 2]), masks))
    return images, targets


@pytest.fixture
def gpu_kernels(monkeypatch):
    """torchvision's RoIAlign, as a GPU run uses, in place of detkit's CPU kernel."""
    ra = sys.modules["detkit.ops.roi_align"]
    monkeypatch.setattr(ra, "_use_torchvision", lambda x: True)
    monkeypatch.setattr(sys.modules["detkit.models.poolers"], "_use_torchvision", lambda x: True)


def _model(name: str) -> torch.nn.Module:
    cfg = load_config(CONFIGS[name], SMALL)
    torch.manual_seed(0)
    return build_detector(cfg, num_classes=3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_tensor_the_model_creates_names_its_device(name, gpu_kernels):
    model = _model(name)
    images, targets = _batch()
    model.train()
    with torch.device("meta"):  # the default device of tensors created without device=
        losses = model(images, targets)
        sum(losses.values()).backward()
    assert all(v.device.type == "cpu" and torch.isfinite(v) for v in losses.values()), losses
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.device.type == "cpu" for g in grads)

    with torch.device("meta"):
        dets = model.predict(images, paste_masks=False)
    for det, img in zip(dets, images):
        assert det.boxes.device.type == "cpu" and det.scores.device.type == "cpu"
        assert len(det) > 0
        with torch.device("meta"):
            out = rescale_detections(det, tuple(img.shape[-2:]), (2 * img.shape[1], 2 * img.shape[2]),
                                     model.mask_threshold, model.mask_paste)
        assert out.boxes.device.type == "cpu"
        if name != "faster":
            assert out.masks is not None and out.masks.device.type == "cpu"
            assert tuple(out.masks.shape[-2:]) == (2 * img.shape[1], 2 * img.shape[2])


@pytest.mark.parametrize("name", ["mask", "cascade"])
def test_fp16_autocast_trains_with_a_grad_scaler_and_predicts(name):
    """The GPU's ``train.amp=fp16`` recipe (autocast fp16 + GradScaler), on the CPU's autocast."""
    model = _model(name)
    images, targets = _batch()
    torch.manual_seed(1)  # the same RoI sampling for the fp32 and the first fp16 losses
    with torch.no_grad():
        fp32 = {k: float(v) for k, v in model(images, targets).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for it in range(2):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.float16):
            losses = model(images, targets)
        assert all(v.dtype == torch.float32 for v in losses.values()), {k: v.dtype for k, v in losses.items()}
        if it == 0:  # the fp32 losses, up to half-precision rounding (which also reorders close proposals)
            assert losses.keys() == fp32.keys()
            for k, v in losses.items():
                if "stage" in k and not k.endswith("stage0"):  # later Cascade stages sample from the refined boxes
                    assert 0 < float(v.detach()) < 2 * fp32[k] + 0.1, k
                else:
                    assert float(v.detach()) == pytest.approx(fp32[k], rel=0.1, abs=2e-3), k
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    assert scaler.get_scale() == 2.0**10  # no step skipped for inf/NaN gradients (that halves the scale)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        dets = model.predict(images)
    for det, img in zip(dets, images):
        assert det.boxes.dtype == torch.float32 and det.scores.dtype == torch.float32
        assert torch.isfinite(det.boxes).all() and torch.isfinite(det.scores).all()
        assert det.masks is not None and det.masks.dtype == torch.bool
        assert tuple(det.masks.shape[-2:]) == tuple(img.shape[-2:])
