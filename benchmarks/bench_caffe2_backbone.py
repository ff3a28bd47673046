"""Detectron2 and detkit on the same Caffe2 ImageNet ResNet file: the same backbone features?

Detectron2's recipes start from ``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` (and ``R-101.pkl``,
``FAIR/X-101-32x8d.pkl``): Caffe2 pickles of ``{"blobs": ...}``. This loads one such file into

* Detectron2's ResNet (``build_resnet_backbone``, FrozenBN, its ``DetectionCheckpointer`` with the Caffe2
  renaming), and
* detkit's, through the config a user would run (``configs/detectron2/...``, ``model.backbone.weights=``),

runs both on the same normalized BGR input and prints the largest differences of res2..res5.

Without ``--pkl`` the file is written here, with random weights and Caffe2's blob names (solver momentum blobs
and the ImageNet classifier included), so that no download is needed; with ``--pkl`` it is the real file::

    python benchmarks/bench_caffe2_backbone.py                       # a random R-50 file, written here
    python benchmarks/bench_caffe2_backbone.py --pkl \
        ~/.cache/detkit/weights/dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl

Detectron2 is not on PyPI: build it into its own environment (see docs/parity.md) and run this there.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from detkit.checkpoint import load_initial_weights
from detkit.config import load_config
from detkit.models import build_detector

REPO = Path(__file__).resolve().parents[1]
# arch -> (depth, groups, width per group, stride_in_1x1, detkit config)
ARCHS = {
    "R-50": (50, 1, 64, True, "configs/detectron2/mask_rcnn_R_50_FPN_3x.yaml"),
    "R-101": (101, 1, 64, True, "configs/detectron2/mask_rcnn_R_101_FPN_3x.yaml"),
    "X-101-32x8d": (101, 32, 8, False, "configs/detectron2/mask_rcnn_X_101_32x8d_FPN_3x.yaml"),
}


def detectron2_backbone(arch: str) -> torch.nn.Module:
    from detectron2.config import get_cfg
    from detectron2.modeling.backbone.resnet import build_resnet_backbone
    from detectron2.layers import ShapeSpec

    depth, groups, width, stride_in_1x1, _ = ARCHS[arch]
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NUM_GROUPS = groups
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = width
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


def caffe2_name(d2_key: str) -> str:
    """Detectron2 ResNet key -> the Caffe2 blob it comes from (the inverse of Detectron2's renaming)."""
    if d2_key.startswith("stem.conv1.norm."):
        return "res_conv1_bn_" + {"weight": "s", "bias": "b"}[d2_key.rsplit(".", 1)[1]]
    if d2_key == "stem.conv1.weight":
        return "conv1_w"
    m = re.match(r"^res(\d)\.(\d+)\.(conv[123]|shortcut)\.(norm\.)?(weight|bias)$", d2_key)
    assert m, d2_key
    stage, block, layer, norm, leaf = m.groups()
    branch = "branch1" if layer == "shortcut" else "branch2" + "abc"[int(layer[-1]) - 1]
    if norm:
        return f"res{stage}_{block}_{branch}_bn_{'s' if leaf == 'weight' else 'b'}"
    return f"res{stage}_{block}_{branch}_w"


def write_random_caffe2_file(arch: str, path: Path, seed: int = 0) -> Path:
    """A blobs file laid out as Detectron's ImageNet models: conv weights, folded-BN scale/shift, the fc1000
    classifier and the solver's momentum blobs; random values, BN scales near 1 so activations stay finite."""
    rng = np.random.default_rng(seed)
    blobs: dict[str, np.ndarray] = {}
    for key, value in detectron2_backbone(arch).state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            continue  # Caffe2's AffineChannel has a scale and a shift only
        name = caffe2_name(key)
        if name.endswith("_bn_s"):
            blobs[name] = rng.uniform(0.5, 1.2, value.shape).astype(np.float32)
        elif name.endswith("_bn_b"):
            blobs[name] = rng.uniform(-0.1, 0.1, value.shape).astype(np.float32)
        else:
            fan_in = int(np.prod(value.shape[1:]))
            blobs[name] = (rng.standard_normal(value.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name.endswith("_w"):
            blobs[name + "_momentum"] = np.zeros_like(blobs[name])
    blobs["fc1000_w"] = rng.standard_normal((1000, 2048)).astype(np.float32) * 0.01
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="R-50")
    p.add_argument("--pkl", type=Path, default=None, help="a real Caffe2 ImageNet file (default: write a random one)")
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)

    tmp = tempfile.TemporaryDirectory()
    pkl = args.pkl or write_random_caffe2_file(args.arch, Path(tmp.name) / f"{args.arch}.pkl")

    from detectron2.checkpoint import DetectionCheckpointer

    d2 = detectron2_backbone(args.arch)
    DetectionCheckpointer(d2).load(str(pkl))

    cfg_path = REPO / ARCHS[args.arch][4]
    cfg = load_config(cfg_path, [f"model.backbone.weights={pkl}"])
    detector = build_detector(cfg, 80)
    (report,) = load_initial_weights(detector, cfg, training=True)
    ours = detector.backbone.bottom_up.eval()

    torch.manual_seed(0)
    x = torch.randn(1, 3, *args.size)  # a normalized BGR image: both take the same tensor
    ref, got = d2(x), ours(x)
    print(f"file: {pkl} ({'given' if args.pkl else 'random weights, written here'})")
    print(f"detkit: {cfg_path.relative_to(REPO)}, {report.source_format}: loaded {len(report.loaded)} tensors, "
          f"missing {len(report.missing)}, dropped {sorted({k.split('.')[0] for k in report.dropped})}, "
          f"ignored {len(report.ignored)} momentum blobs")
    print(f"{'level':6} {'shape':>22} {'max |d2|':>10} {'max |diff|':>12} {'relative':>10}")
    worst = 0.0
    for level in ("res2", "res3", "res4", "res5"):
        a, b = ref[level], got[level]
        assert a.shape == b.shape, (level, a.shape, b.shape)
        diff = (a - b).abs().max().item()
        scale = a.abs().max().item()
        worst = max(worst, diff / max(scale, 1e-12))
        print(f"{level:6} {str(tuple(a.shape)):>22} {scale:10.4g} {diff:12.3g} {diff / max(scale, 1e-12):10.2g}")
    verdict = "the same features up to float rounding" if worst < 1e-5 else "DIFFERENT features"
    print(f"largest relative difference {worst:.2g}: {verdict}")


if __name__ == "__main__":
    main()
