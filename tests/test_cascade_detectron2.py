"""Detectron2's Cascade Mask R-CNN files (Misc/cascade_mask_rcnn_R_50_FPN_{1x,3x}) through detkit's loader.

Detectron2 is not installed here: the test writes a zoo-format ``.pkl`` with the key names and shapes
Detectron2's ``CascadeROIHeads`` has (hard-coded below from its naming rules: one 2fc ``box_head.{s}`` and
one class-agnostic ``box_predictor.{s}`` per stage, K + 1 class scores and 4 deltas), and checks that every
key is consumed and every detkit tensor receives, by value, the array it should. The R-50 backbone has the
zoo's widths; the FPN, box-head and mask-head widths are reduced to keep the file small (the conversion does
not depend on them; the zoo's full widths are exercised by benchmarks/parity_detectron2.py).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.checkpoint import CheckpointError, load_initial_weights
from detkit.checkpoint.detectron2 import DETECTRON2, is_pickle_file
from detkit.config import load_config
from detkit.models.build import build_detector

ROOT = Path(__file__).resolve().parents[1]
CASCADE_CFG = ROOT / "configs" / "detectron2" / "cascade_mask_rcnn_R_50_FPN_1x.yaml"
MASK_CFG = ROOT / "configs" / "detectron2" / "mask_rcnn_R_50_FPN_1x.yaml"
FPN, FC, MASK = 32, 64, 16  # reduced widths (Detectron2's zoo: 256, 1024, 256)
SMALL = [f"model.fpn.out_channels={FPN}", f"model.roi_heads.box_head.fc_dim={FC}",
         f"model.roi_heads.mask_head.conv_dim={MASK}"]
STAGES = 3

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


def detectron2_cascade_shapes(num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Detectron2's ``GeneralizedRCNN`` with ``CascadeROIHeads`` (R-50-FPN, mask on).

    Detectron2's naming: ``Conv2d`` with a ``norm`` (FrozenBN) submodule, ``backbone.bottom_up.stem.conv1``,
    ``res{2..5}.{i}.conv{1,2,3}`` and ``shortcut`` on each stage's first block, ``backbone.fpn_lateral{2..5}``
    / ``fpn_output{2..5}``, ``proposal_generator.rpn_head.{conv, objectness_logits, anchor_deltas}``,
    ``roi_heads.box_head.{s}.fc{1,2}``, ``roi_heads.box_predictor.{s}.{cls_score (K+1), bbox_pred (4)}``,
    ``roi_heads.mask_head.{mask_fcn1..4, deconv, predictor (K)}``.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cout: int, cin: int, k: int, norm: bool) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        leaves = ("weight", "bias", "running_mean", "running_var") if norm else ()
        for leaf in leaves:
            shapes[f"{prefix}.norm.{leaf}"] = (cout,)
        if not norm:
            shapes[f"{prefix}.bias"] = (cout,)

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7, True)
    cin = 64
    for stage, blocks, width in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        for i in range(blocks):
            p = f"backbone.bottom_up.res{stage}.{i}"
            if i == 0:
                conv(f"{p}.shortcut", 4 * width, cin, 1, True)
            conv(f"{p}.conv1", width, cin, 1, True)
            conv(f"{p}.conv2", width, width, 3, True)
            conv(f"{p}.conv3", 4 * width, width, 1, True)
            cin = 4 * width
    for level, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        conv(f"backbone.fpn_lateral{level}", FPN, c, 1, False)
        conv(f"backbone.fpn_output{level}", FPN, FPN, 3, False)
    conv("proposal_generator.rpn_head.conv", FPN, FPN, 3, False)
    conv("proposal_generator.rpn_head.objectness_logits", 3, FPN, 1, False)
    conv("proposal_generator.rpn_head.anchor_deltas", 12, FPN, 1, False)
    for s in range(STAGES):
        for name, cout, cin_fc in (("fc1", FC, FPN * 7 * 7), ("fc2", FC, FC)):
            shapes[f"roi_heads.box_head.{s}.{name}.weight"] = (cout, cin_fc)
            shapes[f"roi_heads.box_head.{s}.{name}.bias"] = (cout,)
        for name, cout in (("cls_score", num_classes + 1), ("bbox_pred", 4)):  # class-agnostic: 4 deltas
            shapes[f"roi_heads.box_predictor.{s}.{name}.weight"] = (cout, FC)
            shapes[f"roi_heads.box_predictor.{s}.{name}.bias"] = (cout,)
    for k in range(1, 5):
        conv(f"roi_heads.mask_head.mask_fcn{k}", MASK, FPN if k == 1 else MASK, 3, False)
    shapes["roi_heads.mask_head.deconv.weight"] = (MASK, MASK, 2, 2)  # ConvTranspose2d: (in, out, k, k)
    shapes["roi_heads.mask_head.deconv.bias"] = (MASK,)
    conv("roi_heads.mask_head.predictor", num_classes, MASK, 1, False)
    return shapes


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def arrays() -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(0)
    return OrderedDict((k, rng.standard_normal(s, dtype=np.float32)) for k, s in detectron2_cascade_shapes().items())


@pytest.fixture(scope="module")
def zoo_pkl(tmp_path_factory: pytest.TempPathFactory, arrays) -> Path:
    path = tmp_path_factory.mktemp("zoo") / "model_final_e9d89b.pkl"
    # older zoo files also hold the input normalization they were trained with (Detectron2's BGR defaults)
    legacy = dict(arrays, pixel_mean=np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1),
                  pixel_std=np.ones((3, 1, 1), np.float32))
    with open(path, "wb") as f:
        pickle.dump({"model": legacy, "__author__": "Detectron2 Model Zoo"}, f, protocol=4)
    return path


# hand-written expectations for the cascade's names
RENAMED = {
    "roi_heads.box_head.0.fc1.weight": "roi_heads.box_head.0.fcs.0.weight",
    "roi_heads.box_head.1.fc2.bias": "roi_heads.box_head.1.fcs.1.bias",
    "roi_heads.box_head.2.fc1.bias": "roi_heads.box_head.2.fcs.0.bias",
    "roi_heads.box_predictor.0.cls_score.weight": "roi_heads.box_predictor.0.cls_score.weight",
    "roi_heads.box_predictor.1.bbox_pred.weight": "roi_heads.box_predictor.1.bbox_pred.weight",
    "roi_heads.box_predictor.2.cls_score.bias": "roi_heads.box_predictor.2.cls_score.bias",
    "roi_heads.mask_head.mask_fcn2.weight": "roi_heads.mask_head.convs.1.conv.weight",
    "backbone.bottom_up.res4.0.shortcut.weight": "backbone.bottom_up.res4.0.shortcut.conv.weight",
}


def test_cascade_zoo_pkl_every_key_consumed_and_every_tensor_loaded(zoo_pkl: Path, arrays) -> None:
    cfg = load_config(CASCADE_CFG, SMALL)
    model = build_detector(cfg, num_classes=80)
    assert is_pickle_file(zoo_pkl) and DETECTRON2.matches({k: torch.empty(0) for k in arrays})
    (report,) = load_initial_weights(model, cfg, weights=str(zoo_pkl), training=False)
    assert report.source_format == "Detectron2"
    assert not (report.missing or report.unexpected or report.dropped or report.mismatched), report.summary()
    assert sorted(report.ignored) == ["pixel_mean", "pixel_std"]
    sd = model.state_dict()
    assert sorted(report.loaded) == sorted(sd)
    by_digest = {_digest(a): k for k, a in arrays.items()}
    assert len(by_digest) == len(arrays) == len(sd)
    matched = {}
    for key, value in sd.items():  # a bijection: every tensor holds exactly one array of the file
        src = by_digest.get(_digest(value.numpy()))
        assert src is not None, f"{key} holds no value of the file"
        matched[key] = src
    assert sorted(matched.values()) == sorted(arrays)
    for d2_key, dk_key in RENAMED.items():
        assert matched[dk_key] == d2_key and torch.equal(sd[dk_key], torch.from_numpy(arrays[d2_key]))
    # and the loaded model runs
    det = model.eval().predict([torch.zeros(3, 96, 128)])[0]
    assert det.boxes.shape[1] == 4 and det.masks is not None


def test_cascade_file_into_a_mask_rcnn_config_is_refused(zoo_pkl: Path) -> None:
    cfg = load_config(MASK_CFG, SMALL)
    model = build_detector(cfg, num_classes=80)
    with pytest.raises(CheckpointError) as e:
        load_initial_weights(model, cfg, weights=str(zoo_pkl), training=True)
    msg = str(e.value)
    assert "\n" not in msg and str(zoo_pkl) in msg and "roi_heads.box_head.0.fcs.0.weight" in msg, msg


def test_finetune_reinitializes_only_each_stages_classifier(zoo_pkl: Path, arrays, caplog) -> None:
    cfg = load_config(CASCADE_CFG, SMALL + ["data.class_names=[cat,dog,bird]", "data.category_ids=[1,2,3]"])
    model = build_detector(cfg, num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="detkit"):
        (report,) = load_initial_weights(model, cfg, weights=str(zoo_pkl), training=True)
    class_keys = {f"roi_heads.box_predictor.{s}.cls_score.{p}" for s in range(STAGES) for p in ("weight", "bias")}
    class_keys |= {"roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    assert {k for k, _, _ in report.mismatched} == class_keys
    assert "class layers re-initialized for 3 classes" in caplog.text
    sd = model.state_dict()
    for k in sd:
        if k in class_keys:
            assert torch.equal(sd[k], fresh[k]), k
    for s in range(STAGES):  # class-agnostic box regression carries over to the new classes
        key = f"roi_heads.box_predictor.{s}.bbox_pred.weight"
        assert torch.equal(sd[key], torch.from_numpy(arrays[key]))
