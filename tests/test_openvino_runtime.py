"""runtime="openvino": detkit's ONNX export compiled by OpenVINO, checked against the PyTorch model.

Skipped where OpenVINO is not installed (``pip install -e ".[openvino]"``; the ``dev`` extra has it).
fp32 must give the PyTorch model's detections at the bar of the torchvision parity tests (same
labels, box IoU >= 0.99, scores within 1e-3); bf16 must keep the best detection of each image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from detkit import Predictor
from detkit.errors import UsageError
from detkit.export import ExportError
from detkit.inference.openvino import OpenVINODetector, openvino_available
from detkit.machine import bf16_supported

pytestmark = [pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed (pip install openvino)"),
              pytest.mark.usefixtures("one_thread")]


def _config(tmp_path, arch: str = "mask_rcnn"):
    from test_speed import _cfg  # noqa: PLC0415  (the tiny detector config of the speed tests)

    cfg = _cfg(arch)
    cfg.input.min_size_test, cfg.input.max_size_test = 128, 192
    cfg.data.class_names = ["a", "b", "c"]
    return cfg


def _weights(arch: str) -> dict:
    from test_speed import _detector  # noqa: PLC0415

    return _detector(arch).state_dict()


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((150, 190), (120, 100)):
        img = (rng.random((h, w, 3)) * 60 + 90).astype(np.uint8)
        img[20:80, 30:90] = (200, 40, 40)
        img[h // 2 :, w // 2 :] = (30, 160, 220)
        out.append(img)
    return out


def _same(ref, out) -> None:
    """The parity tests' bar: same count and labels, box IoU >= 0.99, scores within 1e-3."""
    for r, o in zip(ref, out):
        assert len(r) > 0, "the tiny model should detect something"
        assert len(o) == len(r), f"{len(o)} vs {len(r)} detections"
        assert np.array_equal(o.labels, r.labels)
        iou = torchvision.ops.box_iou(torch.from_numpy(r.boxes), torch.from_numpy(o.boxes)).diagonal()
        assert float(iou.min()) >= 0.99, f"min box IoU {float(iou.min()):.4f}"
        assert np.abs(o.scores - r.scores).max() <= 1e-3


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_openvino_fp32_matches_pytorch(tmp_path, arch: str) -> None:
    cfg, weights = _config(tmp_path, arch), _weights(arch)
    ref = Predictor(cfg, weights=weights, precision="fp32")
    ov = Predictor(cfg, weights=weights, precision="fp32", runtime="openvino")
    assert ov.runtime == "openvino" and ov.precision == "fp32"
    images = _images()
    a, b = ref.predict(images), ov.predict(images)
    _same(a, b)
    for p, im in zip(b, images):
        assert p.boxes.dtype == np.float32 and p.labels.dtype == np.int64
        if arch == "mask_rcnn":  # pasted at the input size, like the PyTorch runtime's
            assert p.masks.dtype == bool and p.masks.shape == (len(p), *im.shape[:2])
        else:
            assert p.masks is None


@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16")
def test_openvino_bf16_close_to_fp32(tmp_path) -> None:
    cfg, weights = _config(tmp_path, "faster_rcnn"), _weights("faster_rcnn")
    ref = Predictor(cfg, weights=weights, precision="fp32").predict(_images())
    out = Predictor(cfg, weights=weights, precision="bf16", runtime="openvino").predict(_images())
    for r, o in zip(ref, out):  # bf16: the best detection keeps a close twin
        iou = torchvision.ops.box_iou(torch.from_numpy(r.boxes[:1]), torch.from_numpy(o.boxes))
        assert len(o) > 0 and float(iou.max()) > 0.9


def test_bad_runtime_and_device_are_clear_errors(tmp_path) -> None:
    cfg, weights = _config(tmp_path, "faster_rcnn"), _weights("faster_rcnn")
    with pytest.raises(ValueError, match="runtime"):
        Predictor(cfg, weights=weights, runtime="tensorrt")
    model = Predictor(cfg, weights=weights, optimize=False).model
    with pytest.raises(UsageError, match="precision"):
        OpenVINODetector(model, precision="int4")
    with pytest.raises(ExportError, match="missing.onnx"):
        OpenVINODetector(model, onnx_path=tmp_path / "missing.onnx")
