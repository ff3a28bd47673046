"""TorchScript / ONNX export of Faster and Mask R-CNN (detkit.export, tools/export.py).

Tiny R18 models with random weights whose classifier is rewired so that detections depend on the
image: class logits are positive projections of the box-head features and the background has a
bias of +4; the mask predictor gets Kaiming weights. The blank image (the model's mean color) normalizes to exact zeros, so every feature
is 0 and no score passes the 0.05 threshold (zero detections); textured scenes give detections.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit.checkpoint import CheckpointError
from detkit.config import load_config
from detkit.errors import UsageError
from detkit.export import (
    BackendCheck,
    ExportableDetector,
    ExportError,
    build_export_model,
    check_export_options,
    export_onnx,
    export_torchscript,
    load_onnx,
    load_torchscript,
    paste_masks,
    split_overrides,
    verification_images,
    verify_exports,
)
from detkit.models.build import build_detector
from shared_data import coco128_root, require_coco128

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "export.py"
CONFIG = REPO / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
NUM_CLASSES = 3
OVERRIDES = [
    "model.fpn.out_channels=32",
    "model.roi_heads.box_head.fc_dim=64",
    "model.roi_heads.mask_head.conv_dim=32",
    "model.roi_heads.mask_head.num_conv=2",
    "model.rpn.pre_nms_topk_test=300",
    "model.rpn.post_nms_topk_test=100",
    "model.roi_heads.detections_per_image=30",
    "input.min_size_test=128",
    "input.max_size_test=192",
    f"model.num_classes={NUM_CLASSES}",
]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed (pip install detkit[export])")


# for the whole module, the module-scoped export fixtures included (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread_module")


def scene(h: int, w: int, seed: int) -> torch.Tensor:
    """Gray float [3, h, w] image with four random colored rectangles."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, h, w), 90.0)
    for _ in range(4):
        y0, x0 = int(torch.randint(0, h - 20, (1,), generator=g)), int(torch.randint(0, w - 20, (1,), generator=g))
        hh, ww = int(torch.randint(16, h // 2, (1,), generator=g)), int(torch.randint(16, w // 2, (1,), generator=g))
        img[:, y0 : y0 + hh, x0 : x0 + ww] = torch.rand(3, 1, 1, generator=g) * 255
    return img


def blank(model: torch.nn.Module, h: int, w: int) -> torch.Tensor:
    return model.pixel_mean.detach().cpu().view(3, 1, 1).expand(3, h, w).clone()


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str) -> torch.nn.Module:
    """Calibrated tiny detector (see the module docstring); built once per architecture, never modified."""
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"model.meta_architecture={arch}", *OVERRIDES])
    model = build_detector(cfg, NUM_CLASSES).eval()
    feats: dict[str, torch.Tensor] = {}
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
    model.predict([scene(128, 160, 1)])
    hook.remove()
    pred = model.roi_heads.box_predictor
    with torch.no_grad():
        u = torch.rand(NUM_CLASSES, feats["f"].shape[1], generator=torch.Generator().manual_seed(1))
        alpha = 7.0 / (feats["f"] @ u.T).max()
        pred.cls_score.weight.zero_()
        pred.cls_score.weight[:NUM_CLASSES] = u * alpha
        pred.cls_score.bias.zero_()
        pred.cls_score.bias[NUM_CLASSES] = 4.0  # background column is last
        if model.roi_heads.mask_head is not None:
            # training init starts every mask logit near 0 (std 0.001), where pasting at 0.5 is a coin
            # flip on rounding; Kaiming init gives masks that depend on the features
            torch.nn.init.kaiming_normal_(model.roi_heads.mask_head.predictor.weight, mode="fan_out",
                                          generator=torch.Generator().manual_seed(2))
    return model


@pytest.fixture(scope="module", params=["faster_rcnn", "mask_rcnn"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A calibrated model exported to both formats, traced on a 144x168 scene with detections."""
    model = tiny_model(request.param)
    out = tmp_path_factory.mktemp(request.param)
    sample = scene(144, 168, 0)
    assert len(model.predict([sample])[0]) > 0  # traced with detections
    ts = export_torchscript(model, out / "model.ts", sample)
    onnx_path = export_onnx(model, out / "model.onnx", sample) if HAS_ORT else None
    return {"arch": request.param, "model": model, "ts": ts, "onnx": onnx_path}


@needs_ort
def test_exports_match_pytorch_on_other_sizes_and_zero_detections(exported: dict) -> None:
    model = exported["model"]
    images = [scene(128, 160, 1), scene(176, 128, 2), blank(model, 120, 136)]
    report = verify_exports(model, images, torchscript=exported["ts"], onnx=exported["onnx"])
    assert report.ok, report.summary()
    assert [c.backend for c in report.checks] == ["torchscript", "onnxruntime"] * 3
    counts = [c.num_ref for c in report.checks[::2]]  # PyTorch eager
    assert counts[0] > 0 and counts[1] > 0 and counts[2] == 0, counts  # the test images do what they should
    assert [c.num_out for c in report.checks] == [n for n in counts for _ in range(2)]
    ts, ort = report.worst("torchscript"), report.worst("onnxruntime")
    # eager PyTorch uses detkit.ops.roi_align on CPU, the traced graph torchvision's op: equal to ~1e-6
    assert ts["max_box_diff"] <= 1e-3 and ts["max_score_diff"] <= 1e-5
    assert ort["max_box_diff"] < 1e-3 and ort["max_score_diff"] < 1e-5, ort
    if exported["arch"] == "mask_rcnn":
        assert ort["min_mask_iou"] >= 0.99 and ts["min_mask_iou"] == 1.0

    # zero detections: empty outputs of the right shapes and dtypes, from both exports
    ts_module = load_torchscript(exported["ts"])
    sess = load_onnx(exported["onnx"])
    mask_shape = [(0, 1, 28, 28)] if exported["arch"] == "mask_rcnn" else []
    for outs in (list(ts_module(images[2])), [torch.from_numpy(o) for o in sess.run(None, {"image": images[2].numpy()})]):
        assert [tuple(o.shape) for o in outs] == [(0, 4), (0,), (0,), *mask_shape]
        assert [o.dtype for o in outs[:3]] == [torch.float32, torch.float32, torch.int64]


COCO128 = coco128_root() / "images"


@needs_ort
def test_exports_match_pytorch_on_real_coco_images(exported: dict) -> None:
    require_coco128("images")
    files = sorted(COCO128.glob("*.jpg"))[:2]
    cfg = load_config(CONFIG, OVERRIDES)  # input.min_size_test=128, max_size_test=192
    named = verification_images(cfg, exported["model"], files)  # resized like the Predictor, + a blank image
    assert [im.name for im in named[:2]] == [str(f) for f in files] and named[2].name.startswith("blank")
    assert all(min(im.image.shape[1:]) == 128 and max(im.image.shape[1:]) <= 192 for im in named[:2])
    images = [im.image for im in named[:2]]
    report = verify_exports(exported["model"], images, torchscript=exported["ts"], onnx=exported["onnx"])
    assert report.ok, report.summary()
    assert all(c.num_ref > 0 for c in report.checks)


@needs_ort
def test_onnx_graph_has_dynamic_size_and_standard_ops(exported: dict) -> None:
    import onnx

    graph = onnx.load(str(exported["onnx"])).graph
    (inp,) = graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "image" and dims == [3, "height", "width"]
    names = ["boxes", "scores", "labels"] + (["masks"] if exported["arch"] == "mask_rcnn" else [])
    assert [o.name for o in graph.output] == names
    ops: set[str] = set()
    stack = [graph]
    while stack:  # NMS sits inside the If/Loop subgraphs of torchvision's scripted batched_nms
        g = stack.pop()
        for node in g.node:
            ops.add(node.op_type)
            stack.extend(onnx.helper.get_attribute_value(a) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    assert {"NonMaxSuppression", "RoiAlign", "TopK"} <= ops, sorted(ops)


@needs_ort
def test_export_traced_on_an_image_without_detections(tmp_path: Path) -> None:
    """Tracing an empty result must not freeze the empty path: later images still get detections."""
    model = tiny_model("faster_rcnn")
    empty = blank(model, 144, 176)
    assert len(model.predict([empty])[0]) == 0
    onnx_path = export_onnx(ExportableDetector(model), tmp_path / "m.onnx", empty)  # TorchScript: same trace
    report = verify_exports(model, [scene(128, 160, 1), scene(160, 136, 3)], onnx=onnx_path)
    assert report.ok, report.summary()
    assert all(c.num_out > 0 for c in report.checks)


def test_verification_reports_mismatches_and_crashes() -> None:
    """The checker fails on shifted boxes, wrong counts, wrong shapes and crashing backends."""
    model = tiny_model("faster_rcnn")
    image = scene(128, 160, 1)
    b, s, lab = ExportableDetector(model)(image)
    assert len(b) > 1

    def shifted(x):  # boxes off by 0.05 px
        return b + 0.05, s, lab

    def one_less(x):
        return b[:-1], s[:-1], lab[:-1]

    def flat_boxes(x):
        return b.reshape(-1), s, lab

    def crash(x):
        raise RuntimeError("boom\nsecond line")

    expected = {shifted: "boxes differ", one_less: "have no counterpart", flat_boxes: "boxes has shape", crash: "boom"}
    for fake, needle in expected.items():
        report = verify_exports(model, [image], torchscript=fake)
        assert not report.ok
        (check,) = report.checks
        assert isinstance(check, BackendCheck) and needle in "; ".join(check.problems), check.problems
        assert "second line" not in report.summary()
        assert report.failure_line().startswith("verification failed: torchscript image 0 128x160: ")
        assert needle in report.failure_line() and report.images_without_detections() == []
    report = verify_exports(model, [image], torchscript=lambda x: (b.clone(), s.clone(), lab.clone()))
    assert report.ok and report.failure_line() == ""
    # two detections swapped (as NMS may order near-equal scores on another backend): paired anyway
    perm = torch.arange(len(b))
    perm[[0, 1]] = perm[[1, 0]]
    report = verify_exports(model, [image], torchscript=lambda x: (b[perm], s[perm], lab[perm]))
    assert report.ok and report.checks[0].reordered == 2, report.summary()


def test_verification_tolerates_swaps_at_the_cuts_only() -> None:
    """A detection that a score change within the tolerance moves across the top-k cut or the score
    threshold may be missing or extra; anywhere else a missing or extra detection fails."""
    model = tiny_model("faster_rcnn")
    image = scene(128, 160, 1)
    b, s, lab = ExportableDetector(model)(image)
    assert len(b) > 3 and float(s[-1]) - model.roi_heads.score_thresh > 1e-3 and float(s[1] - s[-1]) > 1e-3
    model.roi_heads.detections_per_image = len(b)  # the reference holds the maximum: its top-k cut is live
    other = (lab[-1:] + 1) % model.num_classes

    def replaced(i: int, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detection i removed, another class's box with ``score`` added at the end."""
        keep = torch.arange(len(b)) != i
        return (torch.cat([b[keep], b[-1:] + 5]), torch.cat([s[keep], score.view(1)]), torch.cat([lab[keep], other]))

    swapped = replaced(len(b) - 1, s[-1])  # the lowest one swapped for a tie: what the top-k cut does
    report = verify_exports(model, [image], torchscript=lambda x: swapped)
    assert report.ok and report.checks[0].at_edge == 2, report.summary()
    confident = replaced(len(b) - 1, s[0])  # the newcomer scores high: no cut explains it
    report = verify_exports(model, [image], torchscript=lambda x: confident)
    assert not report.ok and f"1 of its {len(b)} detections are not in PyTorch's" in report.failure_line()
    lost = replaced(1, s[-1])  # a confident one lost
    report = verify_exports(model, [image], torchscript=lambda x: lost)
    assert not report.ok and f"1 of {len(b)} detections have no counterpart" in report.failure_line()
    too_many = (torch.cat([b, b[-1:] + 5]), torch.cat([s, s[-1:]]), torch.cat([lab, other]))
    report = verify_exports(model, [image], torchscript=lambda x: too_many)
    assert not report.ok and f"more than the model's maximum of {len(b)}" in report.failure_line()
    # at the score threshold a detection may come or go
    model.roi_heads.detections_per_image = len(b) + 10
    model.roi_heads.score_thresh = float(s[-1]) - 5e-5
    report = verify_exports(model, [image], torchscript=lambda x: (b[:-1], s[:-1], lab[:-1]))
    assert report.ok and report.checks[0].at_edge == 1, report.summary()


def test_paste_masks_and_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    masks = torch.zeros(1, 1, 28, 28)
    masks[..., 7:21, 7:21] = 1.0
    pasted = paste_masks(masks, torch.tensor([[10.0, 20.0, 38.0, 48.0]]), (64, 80))
    assert pasted.shape == (1, 64, 80) and pasted.dtype == torch.bool
    ys, xs = torch.nonzero(pasted[0], as_tuple=True)
    assert 15 <= int(ys.min()) <= 28 and 30 <= int(ys.max()) <= 42 and 5 <= int(xs.min()) <= 18

    with pytest.raises(ExportError, match="sample must be a float"):
        export_torchscript(tiny_model("faster_rcnn"), tmp_path / "m.ts", torch.zeros(1, 8, 8))
    with pytest.raises(ExportError, match="opset"):
        export_onnx(tiny_model("faster_rcnn"), tmp_path / "m.onnx", scene(64, 64, 0), opset=11)
    with pytest.raises(ExportError, match="TwoStageDetector"):
        ExportableDetector(torch.nn.Linear(2, 2))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ExportError, match=r"pip install detkit\[export\]"):
        load_onnx(tmp_path / "m.onnx")


# --------------------------------------------------------------------------- tools/export.py
def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_tool_help() -> None:
    r = run_tool("--help", cwd=REPO)
    assert r.returncode == 0
    for needle in ("--format", "--verify-images", "examples:", "torchscript", "onnxruntime"):
        assert needle in r.stdout


def test_tool_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = run_tool("--config", str(CONFIG), "--weights", str(tmp_path / "nope.pth"), "--output", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--weights" in r.stderr, r.stderr
    w = tmp_path / "w.pth"
    w.write_bytes(b"")
    r = run_tool("--config", str(CONFIG), "--weights", str(w), "--output", str(tmp_path), "--opset", "11", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "opset" in r.stderr, r.stderr

    # in-process, the tool's steps in detkit.export: overrides after --verify-images, bad options,
    # weights that do not fit the config, and onnxruntime missing
    assert split_overrides(["a.jpg", "k.x=1"]) == (["a.jpg"], ["k.x=1"])
    with pytest.raises(UsageError, match=r"--opset 11: RoIAlign needs opset >= 16"):
        check_export_options(w, ("onnx",), opset=11)
    with pytest.raises(UsageError, match=r"--sample-size 16 64: use at least 32 x 32"):
        check_export_options(w, ("torchscript",), sample_size=(16, 64))
    torch.save(tiny_model("faster_rcnn").state_dict(), w)
    cfg = load_config(CONFIG, ["model.meta_architecture=mask_rcnn", *OVERRIDES])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(w))}.* does not fit .*missing.*roi_heads\.mask_head") as err:
        build_export_model(cfg, NUM_CLASSES, w, "cpu")
    assert "\n" not in str(err.value) and "--weights" in str(err.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ExportError, match=r"onnxruntime not installed.*pip install detkit\[export\]"):
        check_export_options(w, ("torchscript", "onnx"), verify=True)  # --format both --verify
    if HAS_ORT:
        check_export_options(w, ("torchscript", "onnx"), verify=False)  # exporting ONNX needs no onnxruntime


@needs_ort
def test_tool_end_to_end(tmp_path: Path) -> None:
    model = tiny_model("faster_rcnn")  # Mask R-CNN exports are checked above; this checks the tool
    weights = tmp_path / "weights.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "exported"
    r = run_tool(
        "--config", str(CONFIG), "--weights", str(weights), "--format", "both", "--output", str(out), "--verify",
        "model.meta_architecture=faster_rcnn", *OVERRIDES,
        # the shapes set names 4 classes; the tiny model has 3 (resolve_classes makes them agree)
        "data.class_names=[box, disc, bar]", cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert "verification passed" in r.stdout
    assert {p.name for p in out.iterdir()} == {"model.ts", "model.onnx", "config.yaml", "export.json"}
    manifest = json.loads((out / "export.json").read_text())
    ver = manifest["verification"]
    assert ver["ok"] and manifest["architecture"] == "faster_rcnn" and manifest["class_names"] == ["box", "disc", "bar"]
    assert set(manifest["outputs"]) == {"boxes", "scores", "labels"} and manifest["files"]["onnx"] == "model.onnx"
    counts = [c["num_ref"] for c in ver["checks"] if c["backend"] == "onnxruntime"]
    assert len(counts) == 3 and counts[0] > 0 and counts[-1] == 0, counts  # scenes + the blank image
    sizes = {tuple(c["image_size"]) for c in ver["checks"]}
    assert tuple(manifest["traced_with_size"]) not in sizes and len(sizes) == 3
