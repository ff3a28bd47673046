"""Masks are pasted only when asked for: Predictor.predict(masks=...) and the server's ?masks=rle. A
25-megapixel upload to a Mask R-CNN server without ?masks raises the server's peak RSS by less than
1 GB (measured: about 110 MB; the same upload with ?masks=rle, 61 pasted masks, raised it by 6 GB,
which is what every upload cost before masks became opt-in)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_configs import TINY_MASK_RCNN

from detkit import Predictor

pytest.importorskip("fastapi", reason="the serve extra is not installed")

# every proposal may become a detection: up to 100 masks per image
CONFIG = TINY_MASK_RCNN.replace("    detections_per_image: 3\n", "    score_thresh_test: 0.0\n    detections_per_image: 100\n")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("masks") / "tiny.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_predict_pastes_masks_only_when_asked(config: Path) -> None:
    torch.manual_seed(0)
    p = Predictor(str(config))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(2)]
    full = p.predict(images)
    none = p.predict(images, masks=False)
    mixed = p.predict(images, masks=[False, True])
    assert full[0].masks is not None and full[0].masks.shape == (len(full[0]), 90, 120) and len(full[0]) > 0
    assert none[0].masks is None and none[1].masks is None and p(images[0], masks=False).masks is None
    assert mixed[0].masks is None and np.array_equal(mixed[1].masks, full[1].masks)
    for a, b in zip(full, none):  # the detections themselves do not change
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    with pytest.raises(ValueError, match="2 images"):
        p.predict(images, masks=[True])


_SERVER = """
import io, json, resource, sys
import cv2, numpy as np, torch
from fastapi.testclient import TestClient
from detkit.serve.app import create_app
from detkit.serve.settings import ServeOptions, build_predictor

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

torch.manual_seed(0)
opts = ServeOptions(config=sys.argv[1], max_batch=1, max_pixels=25_000_000)
app = create_app(build_predictor(opts), opts)
img = np.full((5000, 5000, 3), 90, np.uint8)
img[1000:3000, 1500:4000] = (200, 40, 40)
ok, jpg = cv2.imencode(".jpg", img)
del img
out = {}
with TestClient(app) as c:
    c.post("/v1/predict", files={"image": ("small.jpg", cv2.imencode(".jpg", np.zeros((64, 64, 3), np.uint8))[1].tobytes())})
    for query in ("",):
        before = peak_mb()
        r = c.post("/v1/predict" + query, files={"image": ("big.jpg", jpg.tobytes())})
        body = r.json()
        out[query or "none"] = {"status": r.status_code, "detections": len(body["boxes"]),
                                "masks": len(body.get("masks", [])), "peak_rise_mb": peak_mb() - before}
print(json.dumps(out))
"""


def test_25_megapixel_upload_without_masks_stays_under_1_gb(config: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _SERVER, str(config)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    plain = got["none"]
    assert plain["status"] == 200 and plain["detections"] >= 50 and plain["masks"] == 0
    assert plain["peak_rise_mb"] < 1024, got
