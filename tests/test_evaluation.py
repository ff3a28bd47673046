"""COCOEvaluator against pycocotools' COCOeval run directly on the same results."""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.evaluation import (
    SUMMARY_KEYS,
    COCOEvaluator,
    detections_to_coco,
    format_coco_table,
    format_per_class_table,
)
from detkit.structures import Detections
from shared_data import coco128_root, require_coco128

CATEGORY_IDS = [3, 7, 12]  # non-contiguous; labels 0, 1, 2
CLASS_NAMES = ["cat", "dog", "bird"]
IMAGES = {1: (64, 80), 2: (48, 48), 3: (120, 110), 4: (40, 40)}  # id -> (h, w); image 4 has no GT
COCO128 = coco128_root() / "annotations.json"


def _rect(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO-style uncompressed RLE (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def _make_gt() -> dict:
    polys = [  # (image, category id, polygon)
        (1, 3, _rect(5, 5, 25, 20)),  # small
        (1, 7, [30, 10, 75, 10, 75, 55, 52, 40, 30, 55]),  # medium, notched
        (2, 3, _rect(2, 2, 40, 40)),  # medium
        (2, 12, _rect(40, 40, 46, 46)),  # small
        (3, 7, _rect(5, 5, 105, 105)),  # large
        (3, 12, _rect(10, 106, 30, 118)),  # small
        (3, 3, [60, 20, 100, 20, 80, 60]),  # medium triangle
    ]
    anns = []
    for i, (img, cat, poly) in enumerate(polys, start=1):
        h, w = IMAGES[img]
        rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
        x, y = poly[0::2], poly[1::2]
        anns.append({
            "id": i, "image_id": img, "category_id": cat, "segmentation": [poly], "iscrowd": 0,
            "area": float(mask_util.area(rle)), "bbox": [min(x), min(y), max(x) - min(x), max(y) - min(y)],
        })
    crowd = np.zeros(IMAGES[3], dtype=np.uint8)
    crowd[108:118, 60:100] = 1
    anns.append({
        "id": len(anns) + 1, "image_id": 3, "category_id": 3, "segmentation": _uncompressed_rle(crowd),
        "iscrowd": 1, "area": float(crowd.sum()), "bbox": [60, 108, 40, 10],
    })
    return {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, (h, w) in IMAGES.items()],
        "annotations": anns,
        "categories": [{"id": 12, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("gt") / "instances.json"
    path.write_text(json.dumps(_make_gt()))
    return str(path)


def _load_coco(path: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def _box_mask(box: list[float], h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    m[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
    return m


def _fixed_detections(gt_path: str) -> dict[int, Detections]:
    """Deterministic imperfect detections: jittered GT, a wrong label, FPs (one on image 4)."""
    coco = _load_coco(gt_path)
    g = torch.Generator().manual_seed(0)
    per_image: dict[int, list[tuple[list[float], float, int]]] = {i: [] for i in IMAGES}
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = (torch.rand(4, generator=g) * 6 - 3).tolist()
        box = [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]
        score = float(torch.rand(1, generator=g)) * 0.8 + 0.2
        per_image[ann["image_id"]].append((box, score, CATEGORY_IDS.index(ann["category_id"])))
    per_image[1].append(([6, 6, 24, 21], 0.9, 2))  # right place, wrong class
    per_image[2].append(([20, 5, 45, 30], 0.5, 0))  # poorly localized duplicate
    per_image[4].append(([5, 5, 30, 30], 0.95, 1))  # false positive on the image without GT
    per_image[3].append(([0, 60, 30, 100], 0.1, 2))  # low-score false positive
    out = {}
    for img, dets in per_image.items():
        h, w = IMAGES[img]
        boxes = torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4)
        masks = torch.stack([_box_mask(d[0], h, w) for d in dets]) if dets else torch.zeros(0, h, w, dtype=torch.bool)
        out[img] = Detections(
            boxes=boxes,
            scores=torch.tensor([d[1] for d in dets], dtype=torch.float32),
            labels=torch.tensor([d[2] for d in dets], dtype=torch.int64),
            masks=masks,
        )
    return out


def _perfect_detections(coco: COCO, category_ids: list[int], with_masks: bool = True) -> dict[int, Detections]:
    """The ground truth (crowd excluded) fed back as detections with score 1."""
    out = {}
    for img_id, img in coco.imgs.items():
        anns = [a for a in coco.imgToAnns[img_id] if not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        masks = None
        if with_masks:
            masks = torch.zeros(len(anns), img["height"], img["width"], dtype=torch.bool)
            for i, a in enumerate(anns):
                masks[i] = torch.from_numpy(coco.annToMask(a).astype(bool))
        out[img_id] = Detections(
            boxes=boxes.reshape(-1, 4),
            scores=torch.ones(len(anns)),
            labels=torch.tensor([category_ids.index(a["category_id"]) for a in anns], dtype=torch.int64),
            masks=masks,
        )
    return out


def _evaluate(gt, dets: dict[int, Detections], image_ids=None, **kwargs) -> tuple[COCOEvaluator, dict]:
    ev = COCOEvaluator(gt, CATEGORY_IDS, CLASS_NAMES, **kwargs)
    ids = list(dets) if image_ids is None else image_ids
    ev.process(ids, [dets[i] for i in ids])
    return ev, ev.evaluate()


def _hand_results(dets: dict[int, Detections], iou_type: str) -> list[dict]:
    """COCO results written independently of the evaluator (segm results carry no bbox)."""
    res = []
    for img, d in dets.items():
        for i in range(len(d)):
            r = {"image_id": img, "category_id": CATEGORY_IDS[int(d.labels[i])], "score": float(d.scores[i])}
            if iou_type == "bbox":
                x1, y1, x2, y2 = d.boxes[i]
                r["bbox"] = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
            else:
                rle = mask_util.encode(np.asfortranarray(d.masks[i].numpy().astype(np.uint8)))
                r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            res.append(r)
    return res


def _direct_cocoeval(gt_path: str, results_file: Path, iou_type: str, cat_ids=None) -> tuple[COCOeval, str]:
    gt = _load_coco(gt_path)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return ev, buf.getvalue()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_matches_pycocotools_directly(gt_file: str, tmp_path: Path) -> None:
    dets = _fixed_detections(gt_file)
    _, metrics = _evaluate(gt_file, dets)
    summaries = []
    for iou_type in ("bbox", "segm"):
        results_file = tmp_path / f"results_{iou_type}.json"
        results_file.write_text(json.dumps(_hand_results(dets, iou_type)))
        ev, summary = _direct_cocoeval(gt_file, results_file, iou_type)
        summaries.append(f"{iou_type}:\n{summary.rstrip()}")
        assert 0 < ev.stats[0] < 1  # a non-trivial score, so the comparison means something
        for key, stat in zip(SUMMARY_KEYS, ev.stats):
            expected = stat * 100 if stat >= 0 else math.nan
            assert _same(metrics[f"{iou_type}/{key}"], expected), (iou_type, key)
    assert metrics["bbox/AP"] != metrics["segm/AP"]
    # the table reproduces pycocotools' printed summary line by line
    assert format_coco_table(metrics) == "\n".join(summaries)


def test_per_class_ap_matches_single_category_runs(gt_file: str, tmp_path: Path) -> None:
    dets = _fixed_detections(gt_file)
    _, metrics = _evaluate(gt_file, dets)
    for iou_type in ("bbox", "segm"):
        results_file = tmp_path / f"results_{iou_type}.json"
        results_file.write_text(json.dumps(_hand_results(dets, iou_type)))
        for cat, name in zip(CATEGORY_IDS, CLASS_NAMES):
            ev, _ = _direct_cocoeval(gt_file, results_file, iou_type, cat_ids=[cat])
            assert metrics[f"{iou_type}/AP-{name}"] == pytest.approx(ev.stats[0] * 100, abs=1e-9), (iou_type, name)
    table = format_per_class_table(metrics, "bbox", columns=2)
    assert "| cat " in table and "| bird " in table
    assert f"{metrics['bbox/AP-dog']:.3f}" in table


def test_perfect_predictions_score_100(gt_file: str) -> None:
    coco = _load_coco(gt_file)
    _, metrics = _evaluate(gt_file, _perfect_detections(coco, CATEGORY_IDS))
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
            assert metrics[f"{iou_type}/{key}"] == pytest.approx(100.0), (iou_type, key)
        for name in CLASS_NAMES:
            assert metrics[f"{iou_type}/AP-{name}"] == pytest.approx(100.0)


def test_no_detections_gives_zero(gt_file: str) -> None:
    empty = {
        i: Detections(
            torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, h, w, dtype=torch.bool)
        )
        for i, (h, w) in IMAGES.items()
    }
    ev, metrics = _evaluate(gt_file, empty)
    assert ev.results == []
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}/AP"] == 0.0
        assert metrics[f"{iou_type}/AR100"] == 0.0
        assert all(metrics[f"{iou_type}/AP-{n}"] == 0.0 for n in CLASS_NAMES)


def test_only_processed_images_are_evaluated_and_empty_gt_images_count(gt_file: str) -> None:
    coco = _load_coco(gt_file)
    perfect = _perfect_detections(coco, CATEGORY_IDS)
    # images 1 and 2 only: image 3's ground truth must not count as missed
    _, metrics = _evaluate(gt_file, perfect, image_ids=[1, 2], iou_types=("bbox",))
    assert metrics["bbox/AP"] == pytest.approx(100.0)
    # a false positive on image 4 (no GT at all), more confident than every true positive,
    # must lower the dog AP
    fp = Detections(torch.tensor([[5.0, 5, 30, 30]]), torch.tensor([1.0]), torch.tensor([1]), None)
    halved = {i: Detections(d.boxes, d.scores * 0.5, d.labels) for i, d in perfect.items()}
    _, metrics = _evaluate(gt_file, {**halved, 4: fp}, iou_types=("bbox",))
    assert metrics["bbox/AP-dog"] < 99.0
    assert metrics["bbox/AP-cat"] == pytest.approx(100.0)


def test_labels_map_to_category_ids_and_results_file(gt_file: str, tmp_path: Path) -> None:
    ev = COCOEvaluator(gt_file, CATEGORY_IDS, CLASS_NAMES, iou_types=("bbox",))
    det = Detections(
        torch.tensor([[1.0, 2.0, 11.0, 22.0], [0.0, 0.0, 4.0, 4.0]]), torch.tensor([0.9, 0.3]), torch.tensor([0, 2])
    )
    ev.process([2], [det])
    assert [r["category_id"] for r in ev.results] == [3, 12]
    assert ev.results[0]["bbox"] == [1.0, 2.0, 10.0, 20.0]  # xyxy -> xywh
    out = tmp_path / "sub" / "results.json"
    ev.write_results(out)
    assert json.loads(out.read_text()) == ev.results
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_detections_to_coco_records() -> None:
    """The one conversion: field order, float32 or rounded values, category ids, RLE masks, extras."""
    masks = np.zeros((2, 30, 40), bool)
    masks[0, 3:9, 4:12] = True
    masks[1, 10:25, 20:38] = True
    boxes = torch.tensor([[1.1, 2.2, 33.3, 14.7], [20.0, 10.0, 38.0, 25.0]])
    scores, labels = torch.tensor([0.91234567, 0.5]), torch.tensor([2, 0])
    recs = detections_to_coco(5, boxes, scores, labels, CATEGORY_IDS, masks)
    assert [list(r) for r in recs] == [["image_id", "category_id", "bbox", "score", "segmentation"]] * 2
    assert [(r["image_id"], r["category_id"]) for r in recs] == [(5, 12), (5, 3)]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)  # float32 arithmetic
    assert [r["bbox"] for r in recs] == xywh.tolist() and [r["score"] for r in recs] == scores.tolist()
    for r, m in zip(recs, masks):
        assert r["segmentation"]["size"] == [30, 40] and isinstance(r["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_util.decode(r["segmentation"]).astype(bool), m)
    assert json.loads(json.dumps(recs)) == recs

    # numpy input, rounding, label + 1, extras placed before the segmentation
    rounded = detections_to_coco(5, boxes.numpy(), scores.numpy(), labels.numpy(), None, masks,
                                 extras=[{"file_name": "a.png"}, {"file_name": "a.png"}],
                                 bbox_decimals=2, score_decimals=5)
    assert list(rounded[0]) == ["image_id", "category_id", "bbox", "score", "file_name", "segmentation"]
    assert rounded[0]["bbox"] == [1.1, 2.2, 32.2, 12.5] and rounded[0]["score"] == 0.91235
    assert [r["category_id"] for r in rounded] == [3, 1]
    assert rounded[0]["segmentation"] == recs[0]["segmentation"]
    assert detections_to_coco(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), [3]) == []
    with pytest.raises(ValueError, match=r"labels span \[0, 2\] but category_ids has 2 entries"):
        detections_to_coco(1, boxes, scores, labels, [3, 7])
    with pytest.raises(ValueError, match=r"boxes have shape \(2, 3\), expected \(2, 4\)"):
        detections_to_coco(1, boxes[:, :3], scores, labels, CATEGORY_IDS)


def test_bad_inputs_raise_clear_errors(gt_file: str) -> None:
    ev = COCOEvaluator(gt_file, CATEGORY_IDS, CLASS_NAMES)
    h, w = IMAGES[1]
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    good = Detections(torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0.5]), torch.tensor([0]), mask)
    with pytest.raises(ValueError, match="image id 99 is not in"):
        ev.process([99], [good])
    with pytest.raises(ValueError, match=r"labels must be contiguous in \[0, 3\)"):
        ev.process([1], [Detections(good.boxes, good.scores, torch.tensor([3]), good.masks)])
    with pytest.raises(ValueError, match="original image size"):
        ev.process([1], [Detections(good.boxes, good.scores, good.labels, torch.zeros(1, 1, 28, 28))])
    with pytest.raises(ValueError, match="iou_types=\\('bbox',\\)"):
        ev.process([1], [Detections(good.boxes, good.scores, good.labels, None)])
    with pytest.raises(ValueError, match=r"category ids \[5\] are not in"):
        COCOEvaluator(gt_file, [3, 5], ["a", "b"])
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        COCOEvaluator(gt_file, CATEGORY_IDS, CLASS_NAMES, backend="nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        COCOEvaluator(gt_file + ".missing", CATEGORY_IDS, CLASS_NAMES)


def test_faster_coco_eval_backend_matches(gt_file: str) -> None:
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed")
    dets = _fixed_detections(gt_file)
    _, ref = _evaluate(gt_file, dets)
    _, fast = _evaluate(gt_file, dets, backend="faster_coco_eval")
    assert ref.keys() == fast.keys()
    diffs = [abs(ref[k] - fast[k]) for k in ref if not (math.isnan(ref[k]) and math.isnan(fast[k]))]
    assert len(diffs) == len(ref)  # nan in the same places
    assert max(diffs) <= 1e-6, max(diffs)
    # a pycocotools COCO object is accepted by the faster backend too
    _, from_obj = _evaluate(_load_coco(gt_file), dets, backend="faster_coco_eval")
    assert from_obj["segm/AP"] == pytest.approx(ref["segm/AP"], abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, gt_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dets = _fixed_detections(gt_path)
        # rank 1 also sees image 1 again, as a padding DistributedSampler would
        ids = [1, 3] if rank == 0 else [2, 4, 1]
        ev = COCOEvaluator(gt_path, CATEGORY_IDS, CLASS_NAMES)
        ev.process(ids, [dets[i] for i in ids])
        metrics = ev.evaluate()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "n_results": len(ev.results)}))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(gt_file: str, tmp_path: Path) -> None:
    dets = _fixed_detections(gt_file)
    single_ev, single = _evaluate(gt_file, dets)
    mp.spawn(_dist_worker, args=(2, _free_port(), gt_file, str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1["metrics"] == {}
    assert rank0["n_results"] == len(single_ev.results)  # gathered and deduplicated on rank 0
    assert rank0["metrics"].keys() == single.keys()
    for key, value in single.items():
        assert _same(rank0["metrics"][key], value), key


def test_coco128_perfect_predictions() -> None:
    require_coco128("annotations.json")
    coco = _load_coco(str(COCO128))
    cat_ids = sorted(coco.getCatIds())
    names = [coco.cats[c]["name"] for c in cat_ids]
    dets = _perfect_detections(coco, cat_ids, with_masks=False)
    ev = COCOEvaluator(coco, cat_ids, names, iou_types=("bbox",))
    ev.process(list(dets), list(dets.values()))
    metrics = ev.evaluate()
    assert metrics["bbox/AP"] == pytest.approx(100.0)
    assert metrics["bbox/AP50"] == pytest.approx(100.0)
    # classes absent from these 128 images have no GT: nan, never a fake number
    absent = [n for c, n in zip(cat_ids, names) if not coco.getAnnIds(catIds=[c], iscrowd=False)]
    assert all(math.isnan(metrics[f"bbox/AP-{n}"]) for n in absent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_detections_match_cpu(gt_file: str) -> None:
    dets = _fixed_detections(gt_file)
    _, cpu = _evaluate(gt_file, dets)
    _, cuda = _evaluate(gt_file, {i: d.to("cuda") for i, d in dets.items()})
    assert all(_same(cpu[k], cuda[k]) for k in cpu)
