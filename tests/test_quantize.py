"""int8 (detkit.inference.int8, Predictor(precision="int8")): agreement with fp32, save -> reload, fallback, bad files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_iou

pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e",
                    reason="torchao is not installed (pip install 'detkit[int8]'): no PT2E int8 quantization")

from detkit import Predictor  # noqa: E402
from detkit.config import load_config  # noqa: E402
from detkit.models.build import build_detector  # noqa: E402
from detkit.inference.int8 import (  # noqa: E402
    Int8Backbone, Int8BoxHead, Int8RPNHead, QuantizationError, int8_supported, load_quantized, size_buckets)
from tiny_configs import SMALL_MASK_RCNN  # noqa: E402


needs_int8 = pytest.mark.skipif(not int8_supported("cpu"),
                                reason="this CPU has no VNNI / AMX-INT8 (or DETKIT_DISABLE_INT8=1): int8 falls back")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _image(h: int = 150, w: int = 230, seed: int = 0) -> np.ndarray:
    """Smooth shapes on a flat background (random noise would give int8 activations no structure)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 90, dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y : y + rng.integers(15, 60), x : x + rng.integers(15, 80)] = rng.integers(0, 255, 3)
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Config + weights of a random tiny Mask R-CNN with a low background logit (detections appear)."""
    tmp = tmp_path_factory.mktemp("int8")
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL_MASK_RCNN))
    torch.manual_seed(0)
    model = build_detector(load_config(cfg_path), num_classes=3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([1.0, 0.5, 0.0, -5.0]))
    weights = tmp / "w.pth"
    torch.save(model.state_dict(), weights)
    return tmp, cfg_path, weights


def _matches(res, ref, iou_min: float) -> tuple[float, float]:
    """Fraction of ``res`` detections with a same-label ``ref`` twin of IoU >= iou_min, and the largest
    score difference over those pairs."""
    iou = box_iou(torch.from_numpy(res.boxes), torch.from_numpy(ref.boxes))
    iou[torch.from_numpy(res.labels)[:, None] != torch.from_numpy(ref.labels)[None]] = 0.0
    best, twin = iou.max(dim=1)
    ok = best >= iou_min
    diff = np.abs(res.scores[ok.numpy()] - ref.scores[twin[ok].numpy()])
    return float(ok.float().mean()), float(diff.max()) if len(diff) else 0.0


def test_size_buckets() -> None:
    assert size_buckets(800, 1333, 32) == [(800, 960), (800, 1088), (800, 1216), (800, 1344),
                                           (960, 800), (1088, 800), (1216, 800), (1344, 800)]
    assert size_buckets(800, 1333, 32, steps=2) == [(800, 1088), (800, 1344), (1088, 800), (1344, 800)]
    assert size_buckets(96, 160, 32, steps=1) == [(96, 160), (160, 96)]
    assert size_buckets(100, 0, 32, steps=1) == [(128, 416), (416, 128)]  # no cap: up to 4x the short side


@needs_int8
def test_int8_matches_fp32_and_reloads(files) -> None:
    tmp, cfg_path, weights = files
    calib = [_image(seed=s) for s in range(3)]
    images = [_image(seed=10), _image(120, 200, seed=11)]  # padded 96x160 both: one bucket
    fp32 = Predictor(cfg_path, weights=weights).predict(images)
    pred = Predictor(cfg_path, weights=weights, precision="int8", calibration=calib)
    assert pred.precision == "int8" and isinstance(pred.model.backbone, Int8Backbone)
    assert isinstance(pred.model.rpn.head, Int8RPNHead) and pred.int8_state.rpn_head
    assert isinstance(pred.model.roi_heads.box_head, Int8BoxHead) and pred.int8_state.box_head
    assert pred.int8_state.meta["calibration_images"] == 3
    res = pred.predict(images)
    compiled = pred.model.backbone.compile_seconds
    assert list(compiled) == [(96, 160)], compiled  # both padded inputs fit the 96x160 bucket: one graph
    assert list(pred.model.rpn.head.compile_seconds) == [(96, 160)]  # the head picks the same bucket
    # int8 graph really in use: the compiled code runs oneDNN's quantized convolutions
    with torch.profiler.profile() as prof:
        pred(images[0])
    assert any("qconv" in e.key for e in prof.key_averages()), "no int8 convolution ran"
    for r, f in zip(res, fp32):
        assert r.boxes.dtype == np.float32 and r.scores.dtype == np.float32 and r.labels.dtype == np.int64
        assert r.masks.dtype == np.bool_ and r.masks.shape[1:] == f.masks.shape[1:]
        assert len(r) > 0 and abs(len(r) - len(f)) <= max(3, len(f) // 4)
        # Random weights give near-tied scores: int8 noise reorders some and moves boxes of the
        # near-ties, so compare detection sets (as the bf16 test does). Measured on these two images:
        # 0.93 and 1.0 of int8 detections have a same-label fp32 twin at IoU >= 0.5, score diff <= 0.066.
        frac, diff = _matches(r, f, iou_min=0.5)
        assert frac >= 0.8, f"only {frac:.2f} of int8 detections have an fp32 twin"
        assert diff < 0.1
    # the features themselves: relative L2 error measured 0.04-0.09 per level (wrong scales: > 0.5)
    x = pred.model.preprocess([torch.from_numpy(pred.transform(images[1]).image).permute(2, 0, 1)])[0]
    with torch.no_grad():
        ref = Predictor(cfg_path, weights=weights).model.backbone(x)
        got = pred.model.backbone(x)
    assert got.keys() == ref.keys() and all(got[k].shape == ref[k].shape for k in ref)
    for k in ref:
        err = float((got[k].float() - ref[k].float()).norm() / ref[k].float().norm())
        assert err < 0.15, f"{k}: relative error {err:.3f}"

    out = tmp / "q"
    pred.save_quantized(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == pred.int8_state.fingerprint and manifest["calibration_images"] == 3
    data = torch.load(out / "int8_observers.pt", weights_only=True)  # tensors and strings only
    assert set(data) == {"format", "fingerprint", "observers", "rpn_head_observers", "box_head_observers", "meta"}
    assert manifest["rpn_head_observer_tensors"] == len(data["rpn_head_observers"]) > 0
    assert manifest["box_head_observer_tensors"] == len(data["box_head_observers"]) > 0
    again = Predictor(cfg_path, weights=weights, precision="int8", quantized=out).predict(images)
    for a, r in zip(again, res):
        np.testing.assert_array_equal(a.boxes, r.boxes)
        np.testing.assert_array_equal(a.scores, r.scores)
        np.testing.assert_array_equal(a.labels, r.labels)
        np.testing.assert_array_equal(a.masks, r.masks)

    # a file made for other weights is refused, naming the file
    other = {k: v.clone() for k, v in torch.load(weights, weights_only=True).items()}
    other["backbone.bottom_up.stem.conv1.weight"] += 0.01
    with pytest.raises(QuantizationError, match="calibrated for other weights") as e:
        Predictor(cfg_path, weights=other, precision="int8", quantized=out)
    assert str(out / "int8_observers.pt") in str(e.value) and "\n" not in str(e.value)
    other = {k: v.clone() for k, v in torch.load(weights, weights_only=True).items()}
    other["rpn.head.objectness.bias"] += 0.01  # the heads' weights are fingerprinted too
    other["roi_heads.box_head.fcs.1.bias"] += 0.01
    with pytest.raises(QuantizationError, match="calibrated for other weights"):
        Predictor(cfg_path, weights=other, precision="int8", quantized=out)


@needs_int8
def test_int8_box_head(files) -> None:
    """The int8 box head against the fp32 one on RoI features of a real image, for any RoI count."""
    _, cfg_path, weights = files
    pred = Predictor(cfg_path, weights=weights, precision="int8", calibration=[_image(seed=s) for s in range(3)])
    head = pred.model.roi_heads.box_head
    fp32 = Predictor(cfg_path, weights=weights, optimize=False).model.eval()
    x, sizes = fp32.preprocess([torch.from_numpy(pred.transform(_image(seed=12)).image).permute(2, 0, 1)])
    with torch.no_grad():
        feats = fp32.backbone(x)
        proposals, _ = fp32.rpn(sizes, feats, None)
        pooled = fp32.roi_heads.box_pooler([feats[k] for k in fp32.roi_heads.in_features], [proposals[0].boxes])
        assert pooled.shape[0] >= 20
        ref = fp32.roi_heads.box_head(pooled)
        for rows in (pooled.shape[0], 5, 1):  # the RoI count is dynamic; 1 is padded to 2 and cropped
            got = head(pooled[:rows].to(head.input_dtype).contiguous(memory_format=torch.channels_last))
            assert got.shape == ref[:rows].shape and got.dtype == torch.float32
            err = float((got - ref[:rows]).norm() / ref[:rows].norm())
            assert err < 0.15, f"{rows} RoIs: relative error {err:.3f}"  # measured 0.017-0.02
        assert head(pooled[:0]).shape == (0, ref.shape[1])
    with torch.profiler.profile() as prof:
        head(pooled[:7].to(head.input_dtype))
    assert any("qlinear" in e.key for e in prof.key_averages()), "no int8 linear ran"


@needs_int8
def test_int8_rpn_head(files) -> None:
    """The int8 RPN head against the fp32 head on the same features, and its bucket padding: a level
    zero-padded into a larger bucket gives what the graph of its own size gives."""
    _, cfg_path, weights = files
    pred = Predictor(cfg_path, weights=weights, precision="int8", calibration=[_image(seed=s) for s in range(3)])
    head = pred.model.rpn.head
    fp32 = Predictor(cfg_path, weights=weights).model
    x = fp32.preprocess([torch.from_numpy(pred.transform(_image(150, 150, seed=11)).image).permute(2, 0, 1)])[0]
    bucket = head.buckets.bucket_for(96, 96)
    assert tuple(x.shape[-2:]) == (96, 96) and bucket in [(96, 128), (128, 96)]  # padded input, a larger bucket
    with torch.no_grad():
        feats = fp32.backbone(x)
        levels = [feats[k] for k in fp32.rpn.in_features]
        ref = fp32.rpn.head(levels)
        got = head([f.to(head.input_dtype).contiguous(memory_format=torch.channels_last) for f in levels])
        assert list(head.compile_seconds) == [bucket]
        for r, g in zip([*ref[0], *ref[1]], [*got[0], *got[1]]):
            assert g.shape == r.shape and g.dtype == torch.float32
            err = float((g - r).norm() / r.norm())
            assert err < 0.15, f"relative error {err:.3f}"  # measured 0.009-0.04
        head.buckets.sizes.insert(0, (96, 96))  # now the level's own size is a bucket
        exact = head([f.to(head.input_dtype).contiguous(memory_format=torch.channels_last) for f in levels])
    assert sorted(head.compile_seconds) == sorted([(96, 96), bucket])
    for e, g in zip([*exact[0], *exact[1]], [*got[0], *got[1]]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_fallback_warns_once(files, monkeypatch, caplog) -> None:
    tmp, cfg_path, weights = files
    monkeypatch.setattr("detkit.inference.int8.int8_supported", lambda device="cpu": False)
    with caplog.at_level(logging.WARNING, logger="detkit"):
        pred = Predictor(cfg_path, weights=weights, precision="int8", quantized=tmp / "never-read")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "int8 inference is not available" in warnings[0], warnings
    assert pred.precision in ("bf16", "fp32") and pred.precision in warnings[0]
    assert pred.int8_state is None and not isinstance(pred.model.backbone, Int8Backbone)
    res = pred(_image())
    assert res.boxes.dtype == np.float32 and res.labels.dtype == np.int64
    with pytest.raises(ValueError, match="not 'int8'"):
        pred.save_quantized(tmp / "x")


def test_bad_quantized_files(files, tmp_path) -> None:
    _, cfg_path, weights = files
    for bad, match in [(tmp_path / "missing", "not found"), (tmp_path / "garbage.pt", "cannot read"),
                       (tmp_path / "other.pt", "not a detkit int8 file"), (tmp_path / "old.pt", "write it again")]:
        if bad.name == "garbage.pt":
            bad.write_bytes(b"not a torch file")
        elif bad.name == "other.pt":
            torch.save({"weights": torch.zeros(2)}, bad)
        elif bad.name == "old.pt":  # the format before the RPN head was quantized
            torch.save({"format": "detkit-int8-observers/1", "fingerprint": "0", "observers": {}}, bad)
        with pytest.raises(QuantizationError, match=match) as e:
            load_quantized(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    if int8_supported("cpu"):  # through the Predictor: the same one-line error
        with pytest.raises(QuantizationError, match="not found"):
            Predictor(cfg_path, weights=weights, precision="int8", quantized=tmp_path / "missing")
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(cfg_path, weights=weights, precision="int4")


def test_save_quantized_is_atomic(tmp_path, monkeypatch) -> None:
    """An interrupted save (here: torch.save fails half-way) leaves the previous calibration whole."""
    from detkit.inference.int8 import Int8State, save_quantized

    first = Int8State({"obs.min": torch.tensor([-1.0]), "obs.max": torch.tensor([2.0])}, "abc", {"n": 1})
    save_quantized(first, tmp_path)
    before = (tmp_path / "int8_observers.pt").read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    second = Int8State({"obs.min": torch.tensor([-5.0])}, "def", {"n": 2})
    with pytest.raises(OSError, match="disk full"):
        save_quantized(second, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "int8_observers.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8_observers.pt", "manifest.json"]  # no temp file
    loaded = load_quantized(tmp_path, "abc")
    assert torch.equal(loaded.observers["obs.max"], torch.tensor([2.0]))


def test_calibration_images_come_from_every_training_file(tmp_path) -> None:
    """Several training files (data.train lists) with different classes: calibration takes images from all
    of them, whatever their classes (no data.class_names needed), at the Predictor's input size."""
    import cv2

    from detkit.inference.int8 import calibration_images

    names = []
    for k, cat in enumerate(("cat", "dog")):
        folder = tmp_path / f"set{k}"
        folder.mkdir()
        cv2.imwrite(str(folder / "a.png"), np.full((60 + 20 * k, 80, 3), 50 * k, np.uint8))
        coco = {"images": [{"id": 1, "file_name": "a.png", "height": 60 + 20 * k, "width": 80}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400,
                                 "iscrowd": 0}],
                "categories": [{"id": 1, "name": cat}]}
        (tmp_path / f"set{k}.json").write_text(json.dumps(coco))
        names.append((str(tmp_path / f"set{k}.json"), str(folder)))
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL_MASK_RCNN))
    cfg = load_config(config, [f"data.train.annotations=[{names[0][0]},{names[1][0]}]",
                               f"data.train.images=[{names[0][1]},{names[1][1]}]"])
    images = calibration_images(cfg, 5)
    assert sorted(int(im.mean()) for im in images) == [0, 50]  # one image of each file
