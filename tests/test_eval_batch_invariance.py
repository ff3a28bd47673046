"""Evaluation does not depend on test.batch_size: mixed-size images are never padded for each other.

The data are shapes images padded (right / bottom) into landscape, portrait and square canvases, so a
batch of 2 or 4 mixes sizes the way COCO's two orientations do. ``eval_det`` (the package function the
tool calls) writes ``results.json`` at batch 1, 2 and 4; the files agree up to float rounding. The
two-process case is in ``test_ddp.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils

from detkit.config import load_config
from detkit.data.synthetic import make_shapes_coco
from detkit.engine.evaluate import same_size_groups
from detkit.models.build import build_detector

from test_eval_det import DEMO, TINY_MODEL, eval_det

pytestmark = pytest.mark.usefixtures("one_thread")

# (extra rows, extra columns) padded onto each 96 x 96 shapes image: landscape, portrait and square
PADS = [(0, 48), (40, 0), (0, 0), (24, 0), (0, 32), (0, 48), (40, 0)]


def pad_to_mixed_sizes(paths: dict, out: Path) -> tuple[Path, Path]:
    """Copy the val split with each image padded by ``PADS`` (annotations keep their coordinates)."""
    d = json.loads(Path(paths["val_annotations"]).read_text())
    images = out / "images"
    images.mkdir(parents=True)
    sizes = {}
    for im, (dy, dx) in zip(d["images"], PADS):
        img = cv2.imread(str(Path(paths["val_images"]) / im["file_name"]))
        img = cv2.copyMakeBorder(img, 0, dy, 0, dx, cv2.BORDER_CONSTANT, value=(90, 90, 90))
        cv2.imwrite(str(images / im["file_name"]), img)
        im["height"], im["width"] = img.shape[:2]
        sizes[im["id"]] = img.shape[:2]
    for a in d["annotations"]:
        seg = a.get("segmentation")
        if isinstance(seg, dict):  # RLE: its size is the image's
            h, w = sizes[a["image_id"]]
            m = mask_utils.decode(seg)
            padded = np.zeros((h, w), np.uint8)
            padded[: m.shape[0], : m.shape[1]] = m
            rle = mask_utils.encode(np.asfortranarray(padded))
            a["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    ann = out / "val.json"
    ann.write_text(json.dumps(d))
    return ann, images


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixed")
    paths = make_shapes_coco(root / "shapes", num_train=1, num_val=len(PADS), image_size=96, seed=3)
    return pad_to_mixed_sizes(paths, root / "mixed")


def _results(argv: list[str], batch: int, out: Path) -> list[dict]:
    assert eval_det(["--output-dir", str(out), *argv, f"test.batch_size={batch}"]) == 0
    return json.loads((out / "results.json").read_text())


def _by_image(results: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in results:
        out.setdefault(r["image_id"], []).append(r)
    return {k: sorted(v, key=lambda r: (-r["score"], r["bbox"])) for k, v in out.items()}


def test_same_size_groups_keeps_order_within_each_size() -> None:
    ims = [torch.zeros(3, 4, 6), torch.zeros(3, 6, 4), torch.zeros(3, 4, 6), torch.zeros(3, 4, 4)]
    assert same_size_groups(ims) == [[0, 2], [1], [3]]


def _assert_same(got_all: dict[int, list[dict]], ref_all: dict[int, list[dict]], what: str) -> None:
    assert got_all.keys() == ref_all.keys(), what
    for image_id, ref in ref_all.items():
        got = got_all[image_id]
        assert len(got) == len(ref), (what, image_id)
        for g, r in zip(got, ref):
            assert g["category_id"] == r["category_id"], (what, image_id)
            assert g["score"] == pytest.approx(r["score"], abs=1e-4), (what, image_id)
            assert g["bbox"] == pytest.approx(r["bbox"], abs=1e-3), (what, image_id)
            assert mask_utils.iou([g["segmentation"]], [r["segmentation"]], [0])[0, 0] > 0.99, (what, image_id, g, r)


@pytest.fixture(scope="module")
def eval_argv(mixed: tuple[Path, Path], tmp_path_factory) -> list[str]:
    """eval_det arguments (no output folder) for a random-weight tiny Mask R-CNN on the mixed-size images."""
    ann, images = mixed
    extra = ["model.backbone.norm=BN", "model.roi_heads.score_thresh_test=0.05", "input.min_size_test=96",
             "input.max_size_test=160"]
    cfg = load_config(DEMO, TINY_MODEL + ["data.synthetic=null", *extra])
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("weights") / "random.pth"
    model = build_detector(cfg, 4)
    with torch.no_grad():  # mask logits away from 0 (the init's std 0.001 puts every pixel at p = 0.5 +- noise)
        model.roi_heads.mask_head.predictor.weight.normal_(0, 0.1)
    torch.save({"model": model.state_dict()}, ckpt)
    return ["--config", str(DEMO), "--weights", str(ckpt), *TINY_MODEL, "data.synthetic=null",
            f"data.val.annotations={ann}", f"data.val.images={images}", *extra]


def test_results_json_is_the_same_at_batch_1_2_and_4(mixed: tuple[Path, Path], eval_argv: list[str],
                                                      tmp_path: Path) -> None:
    sizes = {(im["height"], im["width"]) for im in json.loads(mixed[0].read_text())["images"]}
    assert len(sizes) >= 4  # landscape, portrait and square images share batches
    runs = {b: _by_image(_results(eval_argv, b, tmp_path / f"b{b}")) for b in (1, 2, 4)}
    assert sum(len(v) for v in runs[1].values()) > 20  # enough detections to compare
    for b in (2, 4):
        _assert_same(runs[b], runs[1], f"batch {b}")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_two_processes_at_batch_2_give_the_one_process_results(eval_argv: list[str], tmp_path: Path) -> None:
    from test_ddp import _torchrun

    ref = _by_image(_results(eval_argv, 1, tmp_path / "one"))
    _torchrun("eval_det.py", ["--output-dir", str(tmp_path / "two"), *eval_argv, "test.batch_size=2"], tmp_path)
    two = _by_image(json.loads((tmp_path / "two" / "results.json").read_text()))
    _assert_same(two, ref, "2 processes")
