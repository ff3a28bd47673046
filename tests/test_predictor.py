"""Predictor: config/weights loading, input validation, empty results, mapping back to the input size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_iou

from detkit import Predictor
from detkit.config import load_config
from detkit.data.transforms import build_detection_transform
from detkit.models.build import build_detector
from detkit.inference import optimize
from detkit.inference.optimize import InferenceConv2d, bf16_supported
from tiny_configs import SMALL_MASK_RCNN

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _write(tmp_path, bias: float, extra: dict | None = None):
    """Config file + weights of a random small Mask R-CNN whose background logit has ``bias``."""
    cfg_dict = {**SMALL_MASK_RCNN, **(extra or {})}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict))
    torch.manual_seed(0)
    model = build_detector(load_config(cfg_path), num_classes=3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([1.0, 0.5, 0.0, bias]))
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    return cfg_path, weights, model


def _image(h: int = 150, w: int = 230, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 90, dtype=np.uint8)
    y1, x1 = min(110, h), min(150, w)
    img[30:y1, 40:x1] = rng.integers(0, 255, (y1 - 30, x1 - 40, 3), dtype=np.uint8)
    return img


def test_no_detections_gives_empty_arrays(tmp_path) -> None:
    cfg_path, weights, _ = _write(tmp_path, bias=100.0)
    pred = Predictor(cfg_path, weights=weights)
    assert pred.class_names == ["cat", "dog", "bird"]
    res = pred(_image())
    assert len(res) == 0
    assert res.boxes.shape == (0, 4) and res.boxes.dtype == np.float32
    assert res.scores.shape == (0,) and res.scores.dtype == np.float32
    assert res.labels.shape == (0,) and res.labels.dtype == np.int64
    assert res.masks.shape == (0, 150, 230) and res.masks.dtype == np.bool_


def test_roundtrip_maps_back_to_input_size(tmp_path) -> None:
    cfg_path, weights, model = _write(tmp_path, bias=-5.0)
    pred = Predictor(cfg_path, weights=weights)
    img = _image()
    res = pred(img)
    assert len(res) > 0
    assert res.masks.shape == (len(res), 150, 230) and res.masks.any()
    assert (res.boxes[:, [0, 2]] <= 230).all() and (res.boxes[:, [1, 3]] <= 150).all() and (res.boxes >= 0).all()
    assert ((res.labels >= 0) & (res.labels < 3)).all()
    assert (np.diff(res.scores) <= 0).all()

    # the same model by hand: the eval pipeline's resize (150x230 -> 96x147), predict, scale boxes
    # by the per-axis ratios
    small = build_detection_transform(load_config(cfg_path).input, is_train=False)(img).image
    assert small.shape == (96, 147, 3)
    model.eval()
    (det,) = model.predict([torch.from_numpy(small).permute(2, 0, 1)], paste_masks=False)
    scale = np.array([230 / 147, 150 / 96, 230 / 147, 150 / 96], dtype=np.float32)
    expected = np.minimum(det.boxes.numpy() * scale, [230, 150, 230, 150])
    np.testing.assert_allclose(res.boxes, expected, atol=1e-3)
    np.testing.assert_allclose(res.scores, det.scores.numpy(), atol=1e-6)
    np.testing.assert_array_equal(res.labels, det.labels.numpy())

    # folding the frozen BNs (the default) only changes float rounding
    unfolded = Predictor(cfg_path, weights=weights, fold_bn=False)(img)
    np.testing.assert_allclose(unfolded.boxes, res.boxes, atol=1e-2)
    np.testing.assert_allclose(unfolded.scores, res.scores, atol=1e-4)

    batch = pred.predict([img, _image(120, 90, seed=1)])
    assert len(batch) == 2 and batch[1].masks.shape[1:] == (120, 90)
    np.testing.assert_allclose(batch[0].boxes, res.boxes, atol=1e-3)


def _check_half_precision(tmp_path, precision: str, dtype: torch.dtype) -> None:
    """``precision`` is really in use (the stored conv weights and the features the model computes)
    and its detections match fp32's."""
    cfg_path, weights, _ = _write(tmp_path, bias=-5.0)
    fp32 = Predictor(cfg_path, weights=weights)(_image())
    pred = Predictor(cfg_path, weights=weights, precision=precision)
    assert pred.precision == precision and pred.model.inference_precision == precision
    convs = [m for m in pred.model.modules() if isinstance(m, InferenceConv2d)]
    assert convs and {m.weight.dtype for m in convs} == {dtype}
    features: list[dict[str, torch.Tensor]] = []
    pred.model.backbone.register_forward_hook(lambda module, args, out: features.append(out))
    res = pred(_image())
    assert len(features) == 1 and {f.dtype for f in features[0].values()} == {dtype}
    assert res.boxes.dtype == np.float32 and res.scores.dtype == np.float32
    assert len(res) > 0 and np.isfinite(res.boxes).all()
    # Random weights give many near-tied scores, so half-precision noise may reorder them and change
    # a few proposals: compare the detection sets, not the top one. Most detections must have a
    # same-label fp32 twin (IoU >= 0.95) with nearly the same score.
    iou = box_iou(torch.from_numpy(res.boxes), torch.from_numpy(fp32.boxes))
    iou[torch.from_numpy(res.labels)[:, None] != torch.from_numpy(fp32.labels)[None]] = 0.0
    best, twin = iou.max(dim=1)
    matched = best >= 0.95
    assert matched.float().mean() >= 0.6, f"only {matched.float().mean():.2f} of {precision} detections match fp32"
    score_diff = np.abs(res.scores[matched.numpy()] - fp32.scores[twin[matched].numpy()])
    assert score_diff.max() < 0.02


def test_bf16_runs_and_returns_float32(tmp_path) -> None:
    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16/AMX, or DETKIT_DISABLE_BF16=1): "
                    "the Predictor would fall back to fp32, so there is no bf16 to test")
    _check_half_precision(tmp_path, "bf16", torch.bfloat16)


def test_fp16_the_gpu_precision_runs_where_allowed_and_falls_back_on_cpu(tmp_path, monkeypatch, caplog) -> None:
    cfg_path, weights, _ = _write(tmp_path, bias=-5.0)
    with caplog.at_level("WARNING", logger="detkit"):
        pred = Predictor(cfg_path, weights=weights, precision="fp16")  # fp16 is for CUDA GPUs
    assert pred.precision == "fp32" and "fp16 inference is for CUDA GPUs" in caplog.text
    # the GPU's fp16 model (weights converted, fp32 islands, F.linear: oneDNN's prepacked linear has no
    # fp16 on this CPU) through the CPU's fp16 kernels
    monkeypatch.setattr(optimize, "fp16_supported", lambda device: True)
    monkeypatch.setattr(optimize, "mkldnn_linear_available", lambda: False)
    _check_half_precision(tmp_path, "fp16", torch.float16)


def test_config_weights_default_and_loaded_config(tmp_path) -> None:
    cfg_path, weights, _ = _write(tmp_path, bias=100.0)
    cfg = load_config(cfg_path, [f"model.weights={weights}"])
    pred = Predictor(cfg, fold_bn=False)  # weights from model.weights
    sd = torch.load(weights, weights_only=True)
    for k, v in pred.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert cfg.model.weights == str(weights), "the caller's config must not be modified"


def test_clear_errors(tmp_path) -> None:
    cfg_path, weights, _ = _write(tmp_path, bias=100.0)
    pred = Predictor(cfg_path, weights=weights)
    for bad in (np.zeros((10, 10, 3), np.float32), np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8)):
        with pytest.raises(ValueError, match="uint8 HxWx3 RGB numpy array") as e:
            pred(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expects a list"):
        pred.predict(_image())
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(cfg_path, weights=weights, precision="fp8")
    no_names = {**SMALL_MASK_RCNN, "data": {}}
    path = tmp_path / "nonames.yaml"
    path.write_text(yaml.safe_dump(no_names))
    with pytest.raises(ValueError, match="number of classes is unknown"):
        Predictor(path)


def test_input_format_bgr_takes_cv2_arrays(tmp_path) -> None:
    """``input_format="BGR"``: the caller's BGR array (cv2.imread's) gives what its RGB twin gives by default."""
    cfg_path, weights, _ = _write(tmp_path, bias=-5.0)
    rgb = _image()
    rgb[30:110, 40:150, 0] = 255  # colour matters: a red patch
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    ref = Predictor(cfg_path, weights=weights)(rgb)
    got = Predictor(cfg_path, weights=weights, input_format="BGR")(bgr)
    assert len(ref) > 0
    np.testing.assert_array_equal(got.boxes, ref.boxes)
    np.testing.assert_array_equal(got.masks, ref.masks)
    wrong = Predictor(cfg_path, weights=weights)(bgr)  # the BGR array read as RGB: another input
    assert len(wrong) != len(ref) or not np.array_equal(wrong.scores, ref.scores)
    with pytest.raises(ValueError, match="input_format must be 'RGB' or 'BGR'"):
        Predictor(cfg_path, weights=weights, input_format="bgr")


def test_faster_rcnn_has_no_masks_and_batches(tmp_path) -> None:
    faster = {"model": {**SMALL_MASK_RCNN["model"], "meta_architecture": "faster_rcnn"}}
    cfg_path, weights, model = _write(tmp_path, bias=-5.0, extra=faster)
    assert not hasattr(model.roi_heads, "mask_head") or model.roi_heads.mask_head is None
    pred = Predictor(cfg_path, weights=weights)
    res = pred(_image())
    assert len(res) > 0, "a background bias of -5 should leave detections"
    assert res.masks is None
    assert res.boxes.dtype == np.float32 and res.boxes.shape == (len(res), 4)
    assert res.scores.dtype == np.float32 and res.scores.shape == (len(res),)
    assert res.labels.dtype == np.int64 and res.labels.shape == (len(res),)
    assert ((res.labels >= 0) & (res.labels < 3)).all()

    batch = pred.predict([_image(), _image(120, 90, seed=1)])
    assert len(batch) == 2
    for r, (h, w) in zip(batch, [(150, 230), (120, 90)]):
        assert r.masks is None
        assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r), 4)
        assert r.labels.dtype == np.int64 and r.labels.shape == (len(r),)
        assert (r.boxes[:, [0, 2]] <= w).all() and (r.boxes[:, [1, 3]] <= h).all()


@pytest.mark.parametrize(
    "min_size, max_size, expected",
    [
        (96, 160, [(96, 147), (128, 96), (160, 21), (96, 160)]),
        (96, 0, [(96, 147), (128, 96), (720, 96), (96, 160)]),  # 0: no cap on the long side
        (64, 100, [(64, 98), (85, 64), (100, 13), (60, 100)]),
    ],
)
def test_model_input_matches_eval_pipeline(tmp_path, monkeypatch, min_size: int, max_size: int, expected) -> None:
    """The Predictor feeds the model exactly what the evaluation dataset feeds it (same tensors)."""
    import json

    import cv2

    from detkit.data.coco import load_coco
    from detkit.engine.detection import build_test_dataset

    shapes = [(150, 230), (120, 90), (300, 40), (96, 160)]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    for i, img in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))  # lossless
    coco = {
        "images": [{"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(shapes)],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SMALL_MASK_RCNN["data"]["class_names"])],
    }
    (tmp_path / "val.json").write_text(json.dumps(coco))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL_MASK_RCNN))
    cfg = load_config(cfg_path, [f"input.min_size_test={min_size}", f"input.max_size_test={max_size}"])
    dataset = build_test_dataset(cfg, load_coco(tmp_path / "val.json", tmp_path, filter_empty=False, is_train=False))
    eval_inputs = [dataset[i].image for i in range(len(shapes))]

    pred = Predictor(cfg, optimize=False)
    seen: list[torch.Tensor] = []
    predict = pred.model.predict

    def capture(tensors, **kwargs):
        seen.extend(t.clone() for t in tensors)
        return predict(tensors, **kwargs)

    monkeypatch.setattr(pred.model, "predict", capture)
    results = pred.predict(images)

    assert [tuple(t.shape[1:]) for t in eval_inputs] == expected
    assert len(seen) == len(shapes)
    for got, want in zip(seen, eval_inputs):
        assert got.dtype == want.dtype == torch.uint8
        assert torch.equal(got, want)
    for r, (h, w) in zip(results, shapes):
        assert r.masks.shape[1:] == (h, w)  # mapped back to the input image
