"""Deterministic synthetic "shapes" datasets, generated in seconds, nothing downloaded.

* :func:`make_shapes_coco`: instance segmentation in COCO format (the embedded default of the
  README's first command). Circles, rectangles, triangles and stars with exact masks on textured
  backgrounds; later shapes occlude earlier ones and the masks hold only the visible part.
  Unoccluded polygonal shapes are written as polygons, everything else as compressed RLE, and
  category ids are non-contiguous (1, 3, 7, 9) to exercise the label mapping.
* :func:`make_shapes_imagefolder`: a classification ImageFolder of the same shape classes.

Every image is drawn from its own ``numpy`` generator seeded with ``(seed, split, index)``, so
the output does not depend on the order or number of other images. A ``manifest.json``
records the parameters; a call whose parameters match an existing, complete dataset returns at
once without regenerating.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Union

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from ..fileio import write_json_atomic
from .coco_dataset import decode_rle

__all__ = ["SHAPE_CLASSES", "make_shapes_coco", "make_shapes_imagefolder", "render_shape"]

PathLike = Union[str, os.PathLike]
_VERSION = 1

#: (COCO category id, name); ids deliberately non-contiguous.
SHAPE_CLASSES: list[tuple[int, str]] = [(1, "circle"), (3, "rectangle"), (7, "triangle"), (9, "star")]

# saturated RGB colours, far from the dull textured backgrounds
_PALETTE = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 220, 40], [220, 50, 220],
     [40, 220, 230], [250, 140, 20], [150, 60, 240], [245, 245, 245]],
    dtype=np.float32,
)
_MIN_VISIBLE = 0.5  # an occluder is rejected if it leaves less than this fraction of an earlier shape
_SPLIT_IDS = {"train": 0, "val": 1}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dull textured background: tinted grey + smooth blotches + pixel noise, float32 HxWx3."""
    base = rng.uniform(50, 130) + rng.uniform(-15, 15, size=3)
    grid = rng.standard_normal((6, 6, 3)).astype(np.float32) * 22.0
    blotches = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(rng.uniform(4, 12))  # grey grain
    return base.astype(np.float32) + blotches + noise


def _polygon_mask(poly: np.ndarray, size: int) -> np.ndarray:
    """Rasterize a polygon [(x, y), ...] exactly as pycocotools will decode it from the JSON."""
    rle = mask_utils.frPyObjects([poly.reshape(-1).astype(np.float64).tolist()], size, size)
    return decode_rle(mask_utils.merge(rle))


def render_shape(rng: np.random.Generator, name: str, size: int, extent: float, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one shape of diameter ~``extent`` centred at (cx, cy) in a ``size`` square.

    Returns (uint8 mask [size, size], polygon [(x, y)] or None for curved shapes).
    """
    r = extent / 2.0
    theta = rng.uniform(0, 2 * math.pi)
    if name == "circle":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8), None
    if name == "rectangle":
        w, h = extent, extent * rng.uniform(0.45, 0.9)
        ang = rng.uniform(-math.pi / 6, math.pi / 6)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2.0
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        poly = corners @ rot.T
    elif name == "triangle":
        angles = theta + np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.25, 0.25, size=3)
        poly = np.stack([np.cos(angles), np.sin(angles)], axis=1) * r
    elif name == "star":
        angles = theta + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        poly = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    else:
        raise ValueError(f"unknown shape {name!r}; choose from {[n for _, n in SHAPE_CLASSES]}")
    poly = poly + np.array([cx, cy])
    return _polygon_mask(poly, size), poly


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    colour = _PALETTE[rng.integers(len(_PALETTE))] + rng.uniform(-15, 15, size=3)
    shade = rng.standard_normal((int(mask.sum()), 3)).astype(np.float32) * 5.0
    img[mask.astype(bool)] = colour + shade


def _make_scene(rng: np.random.Generator, size: int, max_objects: int = 4) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (uint8 HxWx3 RGB) and its instances: dicts with category_id, mask (visible), polygon."""
    img = _background(rng, size)
    placed: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(10):
            cat_id, name = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
            extent = rng.uniform(0.1, 0.5) * size
            cx, cy = rng.uniform(extent / 2, size - extent / 2, size=2)
            mask, poly = render_shape(rng, name, size, extent, cx, cy)
            if mask.sum() < 30:
                continue
            m = mask.astype(bool)
            # would this shape hide too much of an earlier one?
            if all((p["visible"] & ~m).sum() >= _MIN_VISIBLE * p["area_full"] for p in placed):
                break
        else:
            continue
        for p in placed:
            p["visible"] &= ~m
        _paint(img, mask, rng)
        placed.append({"category_id": cat_id, "visible": m, "area_full": int(m.sum()), "polygon": poly})
    instances = [p for p in placed if p["visible"].sum() >= max(30, 0.25 * p["area_full"])]
    return np.clip(img, 0, 255).astype(np.uint8), instances


def _annotation(inst: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
    visible = inst["visible"]
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    occluded = inst["area_full"] != int(visible.sum())
    if inst["polygon"] is not None and not occluded:
        seg: Any = [np.round(inst["polygon"].reshape(-1), 2).tolist()]
    else:
        seg = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id, "image_id": image_id, "category_id": inst["category_id"], "segmentation": seg,
        "area": float(mask_utils.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0,
    }


def _write_image(path: Path, img: np.ndarray) -> None:
    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"cannot encode {path}")
    buf.tofile(str(path))


def _up_to_date(root: Path, params: dict[str, Any], outputs: list[Path]) -> bool:
    manifest = root / "manifest.json"
    try:
        old = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return old == params and all(p.exists() for p in outputs)


def _generate(root: Path, params: dict[str, Any], outputs: list[Path], build: Callable[[], None]) -> None:
    if _up_to_date(root, params, outputs):
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    build()
    write_json_atomic(root / "manifest.json", params, indent=1, sort_keys=True)


def make_shapes_coco(
    root: PathLike, num_train: int = 400, num_val: int = 50, image_size: int = 256, seed: int = 0
) -> dict[str, str]:
    """Generate (or reuse) the shapes instance-segmentation dataset under ``root``.

    Layout: ``root/train/*.jpg``, ``root/val/*.jpg``, ``root/train.json``, ``root/val.json``,
    ``root/manifest.json``. 1-4 shapes per image, 10-50% of the image side.

    Returns:
        paths: ``train_annotations``, ``train_images``, ``val_annotations``, ``val_images``, ``root``.
    """
    if num_train < 0 or num_val < 0 or image_size < 32:
        raise ValueError(f"make_shapes_coco: need num_train/num_val >= 0 and image_size >= 32, got {num_train}, {num_val}, {image_size}")
    root = Path(root)
    counts = {"train": int(num_train), "val": int(num_val)}
    params = {"kind": "shapes_coco", "version": _VERSION, "image_size": int(image_size), "seed": int(seed), **counts}
    paths = {
        "root": str(root),
        "train_annotations": str(root / "train.json"), "train_images": str(root / "train"),
        "val_annotations": str(root / "val.json"), "val_images": str(root / "val"),
    }

    def build() -> None:
        categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in SHAPE_CLASSES]
        for split, n in counts.items():
            (root / split).mkdir(exist_ok=True)
            images, anns = [], []
            for i in range(n):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
                img, instances = _make_scene(rng, image_size)
                name = f"{i:06d}.jpg"
                _write_image(root / split / name, img)
                images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
                for inst in instances:
                    anns.append(_annotation(inst, len(anns) + 1, i + 1))
            coco = {"info": {"description": f"detkit synthetic shapes ({split})", "version": _VERSION},
                    "images": images, "annotations": anns, "categories": categories}
            write_json_atomic(root / f"{split}.json", coco)

    _generate(root, params, [root / "train.json", root / "val.json"], build)
    return paths


def make_shapes_imagefolder(
    root: PathLike, num_per_class_train: int = 200, num_per_class_val: int = 50, image_size: int = 64, seed: int = 0
) -> dict[str, str]:
    """Generate (or reuse) a classification ImageFolder ``root/{train,val}/<shape>/<i>.png``.

    One shape (40-90% of the side) per image on a textured background.

    Returns:
        paths: ``train``, ``val``, ``root``.
    """
    if num_per_class_train < 1 or num_per_class_val < 1 or image_size < 16:
        raise ValueError("make_shapes_imagefolder: need >= 1 image per class per split and image_size >= 16")
    root = Path(root)
    counts = {"train": int(num_per_class_train), "val": int(num_per_class_val)}
    params = {"kind": "shapes_imagefolder", "version": _VERSION, "image_size": int(image_size), "seed": int(seed), **counts}
    paths = {"root": str(root), "train": str(root / "train"), "val": str(root / "val")}

    def build() -> None:
        for split, n in counts.items():
            for k, (_, name) in enumerate(SHAPE_CLASSES):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    rng = np.random.default_rng([seed, 100 + _SPLIT_IDS[split], k, i])
                    img = _background(rng, image_size)
                    extent = rng.uniform(0.4, 0.9) * image_size
                    cx, cy = rng.uniform(extent / 2, image_size - extent / 2, size=2)
                    mask, _ = render_shape(rng, name, image_size, extent, cx, cy)
                    _paint(img, mask, rng)
                    _write_image(folder / f"{i:05d}.png", np.clip(img, 0, 255).astype(np.uint8))

    outputs = [root / s / name / f"{counts[s] - 1:05d}.png" for s in counts for _, name in SHAPE_CLASSES]
    _generate(root, params, outputs, build)
    return paths
