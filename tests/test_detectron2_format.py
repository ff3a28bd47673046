"""Detectron2's files (model-zoo ``.pkl``, ``model_final.pth``) through detkit's loader, and the semantics of
configs/detectron2/*.yaml that differ from torchvision's.

Detectron2 is not installed here: the tests write zoo-format files with Detectron2's key names and shapes,
generated from the structure Detectron2 builds for an R-50-FPN Faster / Mask R-CNN (its naming rules are
hard-coded below, not imported), and check that every key is consumed and lands, by value, in the right
detkit tensor. The restricted unpickler must refuse anything but numpy arrays in plain containers, in one
line naming the global, without running it. Aligned RoIAlign (ROIAlignV2) is checked against
``torchvision.ops.roi_align`` through the config-built pooler, and the anchors against values computed here
with Detectron2's formulas.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

import detkit
from detkit.checkpoint import CheckpointError, load_initial_weights, read_detectron2_pkl
from detkit.checkpoint.detectron2 import DETECTRON2, is_pickle_file
from detkit.config import load_config
from detkit.models.build import build_detector

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detectron2"
MASK_CFG = CONFIGS / "mask_rcnn_R_50_FPN_3x.yaml"
FASTER_CFG = CONFIGS / "faster_rcnn_R_50_FPN_3x.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# --------------------------------------------------------------------------- Detectron2's names and shapes
def detectron2_r50_fpn_shapes(mask: bool, num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``GeneralizedRCNN.state_dict()`` for Detectron2's R-50-FPN Faster / Mask R-CNN.

    Detectron2's naming: ``Conv2d`` with a ``norm`` submodule (FrozenBN: weight, bias, running_mean,
    running_var), ``backbone.bottom_up`` = ResNet (``stem.conv1``, ``res{2..5}.{i}.conv{1,2,3}``,
    ``shortcut`` on the first block of each stage), ``backbone.fpn_lateral{2..5}`` / ``fpn_output{2..5}``,
    ``proposal_generator.rpn_head.{conv, objectness_logits, anchor_deltas}``, ``roi_heads.box_head.fc{1,2}``,
    ``roi_heads.box_predictor.{cls_score (K+1), bbox_pred (4K)}``, ``roi_heads.mask_head.{mask_fcn1..4,
    deconv, predictor (K)}``.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_norm(prefix: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{leaf}"] = (cout,)

    def conv_bias(prefix: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        shapes[f"{prefix}.bias"] = (cout,)

    conv_norm("backbone.bottom_up.stem.conv1", 64, 3, 7)
    cin = 64
    for stage, blocks, width in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        for i in range(blocks):
            p = f"backbone.bottom_up.res{stage}.{i}"
            if i == 0:
                conv_norm(f"{p}.shortcut", 4 * width, cin, 1)
            conv_norm(f"{p}.conv1", width, cin, 1)
            conv_norm(f"{p}.conv2", width, width, 3)
            conv_norm(f"{p}.conv3", 4 * width, width, 1)
            cin = 4 * width
    for level, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        conv_bias(f"backbone.fpn_lateral{level}", 256, c, 1)
        conv_bias(f"backbone.fpn_output{level}", 256, 256, 3)
    conv_bias("proposal_generator.rpn_head.conv", 256, 256, 3)
    conv_bias("proposal_generator.rpn_head.objectness_logits", 3, 256, 1)
    conv_bias("proposal_generator.rpn_head.anchor_deltas", 12, 256, 1)
    for name, cout, cin_fc in (("fc1", 1024, 256 * 7 * 7), ("fc2", 1024, 1024)):
        shapes[f"roi_heads.box_head.{name}.weight"] = (cout, cin_fc)
        shapes[f"roi_heads.box_head.{name}.bias"] = (cout,)
    for name, cout in (("cls_score", num_classes + 1), ("bbox_pred", 4 * num_classes)):
        shapes[f"roi_heads.box_predictor.{name}.weight"] = (cout, 1024)
        shapes[f"roi_heads.box_predictor.{name}.bias"] = (cout,)
    if mask:
        for k in range(1, 5):
            conv_bias(f"roi_heads.mask_head.mask_fcn{k}", 256, 256, 3)
        shapes["roi_heads.mask_head.deconv.weight"] = (256, 256, 2, 2)  # ConvTranspose2d: (in, out, k, k)
        shapes["roi_heads.mask_head.deconv.bias"] = (256,)
        conv_bias("roi_heads.mask_head.predictor", num_classes, 256, 1)
    return shapes


def random_arrays(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(seed)
    return OrderedDict((k, rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items())


def write_zoo_pkl(path: Path, arrays: dict[str, np.ndarray], protocol: int = 4) -> Path:
    """A file laid out as Detectron2's model zoo ships them."""
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=protocol)
    return path


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def mask_arrays() -> "OrderedDict[str, np.ndarray]":
    return random_arrays(detectron2_r50_fpn_shapes(mask=True))


@pytest.fixture(scope="module")
def zoo_pkl(tmp_path_factory, mask_arrays) -> Path:
    return write_zoo_pkl(tmp_path_factory.mktemp("zoo") / "model_final_f10217.pkl", mask_arrays)


# hand-written expectations for names whose conversion is not a plain copy
RENAMED = {
    "backbone.bottom_up.stem.conv1.norm.running_var": "backbone.bottom_up.stem.bn1.running_var",
    "backbone.bottom_up.res3.0.conv2.norm.weight": "backbone.bottom_up.res3.0.bn2.weight",
    "backbone.bottom_up.res4.0.shortcut.weight": "backbone.bottom_up.res4.0.shortcut.conv.weight",
    "backbone.bottom_up.res5.0.shortcut.norm.bias": "backbone.bottom_up.res5.0.shortcut.norm.bias",
    "backbone.fpn_lateral2.weight": "backbone.fpn.lateral_convs.0.conv.weight",
    "backbone.fpn_output5.bias": "backbone.fpn.output_convs.3.conv.bias",
    "proposal_generator.rpn_head.conv.weight": "rpn.head.convs.0.weight",
    "proposal_generator.rpn_head.objectness_logits.bias": "rpn.head.objectness.bias",
    "proposal_generator.rpn_head.anchor_deltas.weight": "rpn.head.anchor_deltas.weight",
    "roi_heads.box_head.fc1.weight": "roi_heads.box_head.fcs.0.weight",
    "roi_heads.box_head.fc2.bias": "roi_heads.box_head.fcs.1.bias",
    "roi_heads.box_predictor.cls_score.weight": "roi_heads.box_predictor.cls_score.weight",  # background last in both
    "roi_heads.box_predictor.bbox_pred.bias": "roi_heads.box_predictor.bbox_pred.bias",  # 4K, no background rows
    "roi_heads.mask_head.mask_fcn4.weight": "roi_heads.mask_head.convs.3.conv.weight",
    "roi_heads.mask_head.deconv.weight": "roi_heads.mask_head.deconv.weight",
    "roi_heads.mask_head.predictor.weight": "roi_heads.mask_head.predictor.weight",
}


def _assert_all_loaded_by_value(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Every model tensor equals exactly one file array (a bijection), and the named renames hold."""
    sd = model.state_dict()
    by_digest = {_digest(a): k for k, a in arrays.items()}
    assert len(by_digest) == len(arrays)
    matched = {}
    for key, value in sd.items():
        src = by_digest.get(_digest(value.numpy()))
        assert src is not None, f"{key} holds no value of the file (left at its initialization)"
        matched[key] = src
    assert sorted(matched.values()) == sorted(arrays), "some file array went nowhere or to two tensors"
    for d2_key, dk_key in RENAMED.items():
        assert matched[dk_key] == d2_key, f"{dk_key} got {matched[dk_key]}, expected {d2_key}"
        assert torch.equal(sd[dk_key], torch.from_numpy(arrays[d2_key]))


# --------------------------------------------------------------------------- loading
def test_zoo_pkl_every_key_consumed_and_every_tensor_loaded(zoo_pkl: Path, mask_arrays) -> None:
    cfg = load_config(MASK_CFG)
    model = build_detector(cfg, num_classes=80)
    assert DETECTRON2.matches({k: torch.empty(0) for k in mask_arrays})
    assert not DETECTRON2.matches(model.state_dict()), "detkit's own names must not look like Detectron2's"
    assert is_pickle_file(zoo_pkl)
    (report,) = load_initial_weights(model, cfg, weights=str(zoo_pkl), training=False)
    assert report.source_format == "Detectron2"
    assert not (report.missing or report.unexpected or report.dropped or report.mismatched or report.ignored), \
        report.summary()
    assert sorted(report.loaded) == sorted(model.state_dict())
    _assert_all_loaded_by_value(model, mask_arrays)


def test_model_final_pth_of_detectron2_training(tmp_path: Path, mask_arrays) -> None:
    """``torch.save`` of Detectron2's trainer: the model's state dict (older versions also saved the derived
    ``cell_anchors`` and ``pixel_mean`` / ``pixel_std`` buffers) next to optimizer / scheduler state."""
    sd = OrderedDict((k, torch.from_numpy(a)) for k, a in mask_arrays.items())
    sd["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    sd["pixel_std"] = torch.ones(3, 1, 1)
    for i in range(5):
        sd[f"proposal_generator.anchor_generator.cell_anchors.{i}"] = torch.zeros(3, 4)
    path = tmp_path / "model_final.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "params": [0, 1]}]},
                "scheduler": {"base_lrs": [0.02], "last_epoch": 269999}, "iteration": 269999}, path)
    assert not is_pickle_file(path)
    renamed = tmp_path / "model_final.pkl"  # a torch file with a .pkl name still goes through torch.load
    renamed.write_bytes(path.read_bytes())
    assert not is_pickle_file(renamed)
    cfg = load_config(MASK_CFG)
    model = build_detector(cfg, num_classes=80)
    (report,) = load_initial_weights(model, cfg, weights=str(path), training=False)
    assert report.source_format == "Detectron2 (training checkpoint)"
    assert report.fits and not report.dropped, report.summary()
    legacy = ["pixel_mean", "pixel_std", *(f"proposal_generator.anchor_generator.cell_anchors.{i}" for i in range(5))]
    assert sorted(report.ignored) == sorted(legacy)  # named in the report, not silently lost
    assert "ignored 7 (settings, not weights" in report.summary()
    _assert_all_loaded_by_value(model, mask_arrays)


def test_mask_rcnn_file_into_faster_rcnn_config_is_refused(zoo_pkl: Path) -> None:
    cfg = load_config(FASTER_CFG)
    model = build_detector(cfg, num_classes=80)
    for training in (False, True):  # mask-head tensors are not class layers: refused for training too
        with pytest.raises(CheckpointError) as e:
            load_initial_weights(model, cfg, weights=str(zoo_pkl), training=training)
        msg = str(e.value)
        assert "\n" not in msg and str(zoo_pkl) in msg
        assert "12 checkpoint tensor(s)" in msg and "roi_heads.mask_head.convs.0.conv.weight" in msg, msg
        assert "use the config they were trained with" in msg


def test_finetune_on_another_class_count_reinitializes_only_class_layers(zoo_pkl: Path, mask_arrays, caplog) -> None:
    cfg = load_config(MASK_CFG, ["data.class_names=[cat,dog,bird]", "data.category_ids=[1,2,3]"])
    model = build_detector(cfg, num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit this config with 3 classes"):
        load_initial_weights(model, cfg, weights=str(zoo_pkl), training=False)  # inference: refused
    with caplog.at_level(logging.INFO, logger="detkit"):
        (report,) = load_initial_weights(model, cfg, weights=str(zoo_pkl), training=True)
    class_keys = {f"roi_heads.box_predictor.{m}.{p}" for m in ("cls_score", "bbox_pred") for p in ("weight", "bias")}
    class_keys |= {"roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    assert {k for k, _, _ in report.mismatched} == class_keys
    assert not (report.missing or report.unexpected or report.dropped)
    assert ("roi_heads.box_predictor.cls_score", (81, 1024), (4, 1024)) in [
        (k.rsplit(".", 1)[0], tuple(c), tuple(m)) for k, c, m in report.mismatched]
    note = ("class layers re-initialized for 3 classes: roi_heads.box_predictor.bbox_pred, "
            "roi_heads.box_predictor.cls_score, roi_heads.mask_head.predictor")
    assert note in caplog.text
    sd = model.state_dict()
    for k in class_keys:
        assert torch.equal(sd[k], fresh[k]), f"{k} should keep its fresh initialization"
    for d2_key, dk_key in RENAMED.items():
        if dk_key not in class_keys:
            assert torch.equal(sd[dk_key], torch.from_numpy(mask_arrays[d2_key]))


# --------------------------------------------------------------------------- the restricted unpickler
class _Payload:
    """A custom class: unpickling it means importing this module and calling it."""

    def __reduce__(self):
        return (_Payload, ())


def test_zoo_pkl_protocols_and_dtypes_read_back(tmp_path: Path) -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=">f8"),
              "c": np.zeros((0, 4), dtype=np.float16), "d": np.array([1, 2], dtype=np.int64)}
    for protocol in (2, 4, 5):
        data = read_detectron2_pkl(write_zoo_pkl(tmp_path / f"p{protocol}.pkl", arrays, protocol))
        assert data["__author__"] == "Detectron2 Model Zoo"
        for k, a in arrays.items():
            t = data["model"][k]
            assert isinstance(t, torch.Tensor) and tuple(t.shape) == a.shape
            assert np.array_equal(t.numpy(), a.astype(a.dtype.newbyteorder("=")))


def test_is_pickle_file_tells_torch_files_apart(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.pkl")  # torch's zip format, whatever the name
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"model": {}}, protocol=4))
    (tmp_path / "zoo.pkl").write_bytes(pickle.dumps({"model": {}}, protocol=2))
    got = {name: is_pickle_file(tmp_path / name) for name in ("zip.pkl", "legacy.pth", "plain.bin", "zoo.pkl", "no.pkl")}
    assert got == {"zip.pkl": False, "legacy.pth": False, "plain.bin": True, "zoo.pkl": True, "no.pkl": False}


@pytest.mark.parametrize("case", ["os_system", "custom_class", "object_array", "ndarray_call"])
def test_restricted_unpickler_refuses_code_in_one_line(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / f"{case}.pkl"
    if case == "os_system":  # protocol 0 by hand: GLOBAL 'os system', then a call with one argument
        path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
        named = "os.system"
    elif case == "custom_class":
        path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2, np.float32), "x": _Payload()}}))
        named = f"{_Payload.__module__}._Payload"
    elif case == "object_array":
        path.write_bytes(pickle.dumps({"model": {"w": np.array([1, None], dtype=object)}}))
        named = "object-dtype array"
    else:  # numpy.ndarray((2,), "O") called directly would skip the dtype check of numpy.dtype
        path.write_bytes(b"cnumpy\nndarray\n((I2\ntS'O'\ntR.")
        named = "numpy.ndarray"
    for load in (read_detectron2_pkl, lambda p: detkit.load_weights(torch.nn.Linear(2, 2), p)):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and named in msg, msg
    assert not marker.exists(), "unpickling ran code"


class _HugeArray:
    """Pickles as numpy's own array reduce, with a shape no file of a few bytes can fill."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self):
        reconstruct = np.array(0).__reduce__()[0]  # numpy's _reconstruct, under its real module name
        return reconstruct, (np.ndarray, self.shape, np.dtype(np.float32))


def test_array_larger_than_its_file_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _HugeArray((2**20, 2**20))}}, protocol=2))  # 4 TiB asked
    assert path.stat().st_size < 1000
    with pytest.raises(CheckpointError) as e:
        read_detectron2_pkl(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "larger than the whole file" in msg, msg
    # numpy's own pickles ask for shape (0,) and still read back (the cap is on what is asked here)
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"model": {"w": np.ones((300, 300), np.float32)}}, protocol=2))
    assert read_detectron2_pkl(ok)["model"]["w"].shape == (300, 300)


@pytest.mark.parametrize("content, says", [
    ({"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}, "a pickle without 'model' or 'blobs'"),
    ([np.zeros(3, np.float32)], "holds a list"),
])
def test_pickle_that_is_not_a_zoo_file(tmp_path: Path, content, says: str) -> None:
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(CheckpointError) as e:
        detkit.load_weights(torch.nn.Linear(2, 2), path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and says in msg, msg
    assert "Detectron2" in msg


# --------------------------------------------------------------------------- configs: what differs from torchvision
@pytest.fixture(scope="module")
def built_mask_r50():
    cfg = load_config(MASK_CFG)
    return cfg, build_detector(cfg, num_classes=80).eval()


def test_aligned_roialign_matches_torchvision_op(built_mask_r50) -> None:
    """ROIAlignV2: each box pooled from its level (Detectron2's rule) by roi_align(aligned=True, sampling 0)."""
    cfg, model = built_mask_r50
    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 8, 640 // s, 640 // s, generator=g) for s in strides]
    boxes = []
    for _ in range(2):  # sizes from 12 to 600 px, aspect 1:2 to 2:1, fractional positions: all levels used
        size = torch.exp(torch.rand(32, 1, generator=g) * math.log(50)) * 12
        aspect = torch.exp((torch.rand(32, 1, generator=g) - 0.5) * math.log(4))
        wh = torch.cat([size / aspect.sqrt(), size * aspect.sqrt()], dim=1)
        xy = torch.rand(32, 2, generator=g) * (640 - wh).clamp(min=1)
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    size = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    level = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(2, 5).long() - 2  # Detectron2's assignment
    assert len(set(level.tolist())) == 4
    for pooler, res in ((model.roi_heads.box_pooler, 7), (model.roi_heads.mask_pooler, 14)):
        assert (pooler.aligned, pooler.sampling_ratio) == (True, 0)
        out = pooler(feats, boxes)
        ref = torch.zeros_like(out)
        for lvl, s in enumerate(strides):
            idx = (level == lvl).nonzero()[:, 0]
            ref[idx] = roi_align(feats[lvl], rois[idx], res, spatial_scale=1.0 / s, sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        legacy = roi_align(feats[1], rois[level == 1], res, 1.0 / 8, sampling_ratio=2, aligned=False)
        assert not torch.allclose(out[level == 1], legacy, atol=1e-3), "the check cannot tell the two ops apart"


def test_anchors_unrounded_with_offset_zero(built_mask_r50) -> None:
    """Detectron2's DefaultAnchorGenerator: w = sqrt(size^2 / ratio), h = ratio * w, centered on the grid
    points (x * stride, y * stride), location-major, ratios 0.5, 1, 2 per location, never rounded."""
    _, model = built_mask_r50
    feats = [torch.zeros(1, 1, 96 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    got = model.rpn.anchor_generator(feats)
    for level, (anchors, stride) in enumerate(zip(got, (4, 8, 16, 32, 64))):
        size = 32.0 * 2**level
        cell = []
        for ratio in (0.5, 1.0, 2.0):
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            cell.append([-w / 2, -h / 2, w / 2, h / 2])
        h_cells, w_cells = 96 // stride, 128 // stride
        expected = [[x * stride + c[0], y * stride + c[1], x * stride + c[2], y * stride + c[3]]
                    for y in range(h_cells) for x in range(w_cells) for c in cell]
        expected_t = torch.tensor(expected, dtype=torch.float64)
        assert anchors.shape == expected_t.shape
        torch.testing.assert_close(anchors.double(), expected_t, rtol=1e-6, atol=1e-4)
    # torchvision's rounded cell anchor for size 32, ratio 0.5 is (-23, -11, 23, 11): this one is not
    assert abs(got[0][0, 0].item() + math.sqrt(2048) / 2) < 1e-4


def test_zoo_configs_reproduce_detectron2_settings() -> None:
    expected = {
        "faster_rcnn_R_50_FPN_1x": ("faster_rcnn", "resnet50", True, 90000),
        "faster_rcnn_R_50_FPN_3x": ("faster_rcnn", "resnet50", True, 270000),
        "faster_rcnn_R_101_FPN_3x": ("faster_rcnn", "resnet101", True, 270000),
        "faster_rcnn_X_101_32x8d_FPN_3x": ("faster_rcnn", "resnext101_32x8d", False, 270000),
        "mask_rcnn_R_50_FPN_1x": ("mask_rcnn", "resnet50", True, 90000),
        "mask_rcnn_R_50_FPN_3x": ("mask_rcnn", "resnet50", True, 270000),
        "mask_rcnn_R_101_FPN_3x": ("mask_rcnn", "resnet101", True, 270000),
        "mask_rcnn_X_101_32x8d_FPN_3x": ("mask_rcnn", "resnext101_32x8d", False, 270000),
        "cascade_mask_rcnn_R_50_FPN_1x": ("mask_rcnn", "resnet50", True, 90000),
        "cascade_mask_rcnn_R_50_FPN_3x": ("mask_rcnn", "resnet50", True, 270000),
    }
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, (arch, net, stride_in_1x1, iters) in expected.items():
        cfg = load_config(CONFIGS / f"{name}.yaml")
        m = cfg.model
        assert (m.meta_architecture, m.backbone.name, m.backbone.stride_in_1x1, cfg.train.max_iters) == (
            arch, net, stride_in_1x1, iters), name
        assert m.input_format == "BGR" and m.pixel_mean == (103.53, 116.28, 123.675), name
        assert m.pixel_std == ((57.375, 57.12, 58.395) if net.startswith("resnext") else (1.0, 1.0, 1.0)), name
        assert m.backbone.norm == "FrozenBN" and m.num_classes is None, name
        assert m.roi_heads.name == ("cascade" if name.startswith("cascade") else "standard"), name
        assert (m.anchors.offset, m.anchors.round_base) == (0.0, False)
        for head in (m.roi_heads.box_head, m.roi_heads.mask_head):
            assert (head.pooler_aligned, head.pooler_sampling_ratio) == (True, 0)
        assert (cfg.input.min_size_test, cfg.input.max_size_test) == (800, 1333)
        assert 0 < m.rpn.min_size < 1e-20 and 0 < m.roi_heads.min_box_size_test < 1e-20
        ids, names = cfg.data.category_ids, cfg.data.class_names
        assert len(ids) == len(names) == len(set(names)) == 80 and ids == sorted(ids) and ids[-1] == 90
        assert (names[0], names[11], names[-1]) == ("person", "stop sign", "toothbrush") and ids[11] == 13
    # the X101-32x8d layout Detectron2 builds (NUM_GROUPS 32, WIDTH_PER_GROUP 8, stride in the 3x3 conv)
    with torch.device("meta"):
        x101 = build_detector(load_config(CONFIGS / "mask_rcnn_X_101_32x8d_FPN_3x.yaml"), 80).backbone.bottom_up
        r50 = build_detector(load_config(MASK_CFG), 80).backbone.bottom_up
    block = x101.res3[0]
    assert (block.conv1.stride, block.conv2.stride, block.conv2.groups) == ((1, 1), (2, 2), 32)
    assert tuple(block.conv2.weight.shape) == (512, 16, 3, 3) and len(x101.res4) == 23
    assert (r50.res3[0].conv1.stride, r50.res3[0].conv2.stride) == ((2, 2), (1, 1))
    for m in x101.modules():
        if hasattr(m, "running_var"):
            assert m.eps == 1e-5
