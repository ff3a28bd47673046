"""Evaluation: inference_on_dataset with an oracle detector, and tools/eval_det.py end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from detkit.config import load_config
from detkit.data.synthetic import make_shapes_coco
from detkit.engine import inference_on_dataset
from detkit.engine.detection import build_evaluator, build_test_dataset, build_test_loader, load_split
from detkit.cli import default_argument_parser, run_cli
from detkit.config import load_detection_config
from detkit.engine.run_detection import evaluate_detection
from detkit.structures import Detections

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
TINY_MODEL = [
    "model.fpn.out_channels=32", "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=30",
    "model.roi_heads.box_head.fc_dim=64", "model.roi_heads.mask_head.conv_dim=16",
    "model.roi_heads.mask_head.num_conv=1", "dataloader.num_workers=0",
]



def eval_det(argv: list[str]) -> int:
    """What tools/eval_det.py does with ``argv``, through the package functions; the exit code."""
    args = default_argument_parser(None, weights=True, resume=False).parse_args(argv)
    return run_cli(lambda _: evaluate_detection(load_detection_config(args.config, args.overrides), args.weights,
                                                args.output_dir) and 0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=6, image_size=128, seed=1)


def _cfg(shapes: dict, *extra: str):
    return load_config(DEMO, TINY_MODEL + [
        "data.synthetic=null", f"data.val.annotations={shapes['val_annotations']}",
        f"data.val.images={shapes['val_images']}", "input.min_size_test=96", "input.max_size_test=200",
        "test.batch_size=2", *extra])


class OracleDetector(nn.Module):
    """Predicts the ground truth of each (resized) image: boxes exactly, masks as 28x28 crops."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.mask_threshold = 0.5
        self.truth = {}
        for i in range(len(dataset)):
            s = dataset[i]
            self.truth[self._key(s.image)] = s.targets

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        return tuple(image.shape) + (int(image.long().sum()),)

    def predict(self, images, paste_masks: bool = True) -> list[Detections]:
        out = []
        for im in images:
            t = self.truth[self._key(im)]
            n = len(t)
            # (N, H, W) GT masks -> (N, 1, 28, 28) probabilities inside each box
            rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], t.boxes], dim=1)
            masks = roi_align(t.masks[:, None].float(), rois, (28, 28), 1.0, 2, aligned=True)
            out.append(Detections(t.boxes.clone(), torch.linspace(1.0, 0.5, n), t.labels.clone(), masks))
        return out


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_inference_on_dataset_with_oracle_gives_perfect_boxes(shapes: dict, backend: str) -> None:
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval", reason="faster-coco-eval not installed")
    cfg = _cfg(shapes, f"test.eval_backend={backend}")
    val = load_split(cfg, "val", is_train=False)
    oracle = OracleDetector(build_test_dataset(cfg, val, with_masks=True))
    sample = build_test_dataset(cfg, val)[0]
    assert tuple(sample.image.shape[-2:]) == (96, 96) and sample.orig_size == (128, 128)  # rescaling matters
    oracle.train()
    metrics = inference_on_dataset(oracle, build_test_loader(cfg, val), build_evaluator(cfg, val), progress=False)
    assert oracle.training  # mode restored
    assert metrics["bbox/AP"] == pytest.approx(100.0, abs=1e-6)
    assert metrics["bbox/AR100"] == pytest.approx(100.0, abs=1e-6)
    assert 60.0 < metrics["segm/AP"] <= 100.0
    assert metrics["segm/AP50"] == pytest.approx(100.0, abs=1e-6)


def test_eval_det_writes_metrics_and_results_that_cocoeval_reproduces(shapes: dict, tmp_path: Path, capsys) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detkit.models.build import build_detector

    # random weights; trainable-BN statistics keep the random activations finite
    extra = ["model.backbone.norm=BN", "model.roi_heads.score_thresh_test=0.0", "model.roi_heads.nms_thresh_test=0.3"]
    cfg = _cfg(shapes, *extra)
    torch.manual_seed(0)
    ckpt = tmp_path / "random.pth"
    torch.save({"model": build_detector(cfg, 4).state_dict()}, ckpt)
    out = tmp_path / "eval"
    argv = ["--config", str(DEMO), "--weights", str(ckpt), "--output-dir", str(out), *TINY_MODEL,
            "data.synthetic=null", f"data.val.annotations={shapes['val_annotations']}",
            f"data.val.images={shapes['val_images']}", "input.min_size_test=96", "input.max_size_test=200", *extra]
    assert eval_det(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") == 2  # bbox+segm
    assert "Per-category bbox AP" in printed and "circle" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert {r["category_id"] for r in results} <= {1, 3, 7, 9}  # the dataset's own (non-contiguous) ids

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(shapes["val_annotations"])
        dt = gt.loadRes([{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert metrics["bbox/AP"] == pytest.approx(100.0 * max(ev.stats[0], 0.0), abs=1e-6)
    assert metrics["bbox/AR100"] == pytest.approx(100.0 * max(ev.stats[8], 0.0), abs=1e-6)


def test_eval_det_rejects_weights_of_another_class_count(shapes: dict, tmp_path: Path, capsys) -> None:
    from detkit.models.build import build_detector

    cfg = _cfg(shapes)
    ckpt = tmp_path / "seven.pth"
    torch.save({"model": build_detector(cfg, 7).state_dict()}, ckpt)
    argv = ["--config", str(DEMO), "--weights", str(ckpt), "--output-dir", str(tmp_path / "o"), *TINY_MODEL,
            "data.synthetic=null", f"data.val.annotations={shapes['val_annotations']}",
            f"data.val.images={shapes['val_images']}"]
    assert eval_det(argv) == 2
    stderr = capsys.readouterr().err
    err = [s for s in stderr.splitlines() if s.startswith("error:")]
    assert len(err) == 1 and "does not fit this config with 4 classes" in err[0] and str(ckpt) in err[0]
    assert "Traceback" not in stderr
    seven = build_detector(cfg, 7).state_dict()
    mismatched = [k for k, v in build_detector(cfg, 4).state_dict().items() if v.shape != seven[k].shape]
    assert mismatched and any(k.startswith("roi_heads") for k in mismatched)
    assert f"{len(mismatched)} tensor(s) differ in shape" in err[0]
    for k in mismatched[:10]:  # every mismatched key is named (at most 10, then "and N more")
        assert f"{k} (checkpoint " in err[0], k
    assert "another architecture or class count" in err[0]
    assert not (tmp_path / "o" / "metrics.json").exists()


class RecordingEvaluator:
    """Keeps what inference_on_dataset hands over; 'metrics' are the detection counts."""

    def reset(self) -> None:
        self.dets: dict[int, Detections] = {}

    def process(self, image_ids, detections) -> None:
        self.dets.update(zip(image_ids, detections))

    def evaluate(self) -> dict[str, float]:
        return {"num_detections": float(sum(len(d) for d in self.dets.values()))}


def test_optimized_copy_gives_the_models_detections_and_leaves_it_untouched(shapes: dict) -> None:
    from torchvision.ops import box_iou

    from detkit.models.build import build_detector

    cfg = _cfg(shapes, "model.roi_heads.score_thresh_test=0.0")
    val = load_split(cfg, "val", is_train=False)
    torch.manual_seed(0)
    model = build_detector(cfg, val.num_classes).train()  # trainable BN, as during training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, fast = RecordingEvaluator(), RecordingEvaluator()
    inference_on_dataset(model, build_test_loader(cfg, val), plain, progress=False)
    inference_on_dataset(model, build_test_loader(cfg, val), fast, progress=False, optimize=True)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.backbone.bottom_up.stem.bn1, nn.BatchNorm2d)  # not folded in place
    assert plain.evaluate()["num_detections"] > 0
    for image_id, ref in plain.dets.items():
        det = fast.dets[image_id]
        assert len(det) == len(ref)
        iou = box_iou(det.boxes, ref.boxes).max(dim=1).values
        assert (iou > 0.99).float().mean() >= 0.95  # folded BN / fused convs: float rounding only
