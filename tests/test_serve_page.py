"""The page of tools/serve.py (detkit/serve/static/) in a real headless Chromium, driven by Selenium.

The app of :func:`detkit.serve.app.create_app` runs with a tiny random-weight Mask R-CNN under uvicorn
on a free 127.0.0.1 port. The browser is the system's (/usr/bin/chromium and /usr/bin/chromedriver,
Debian packages chromium and chromium-driver): nothing is downloaded, and the tests skip with the
reason when either, or selenium, is missing. A coco128 image is uploaded through the file input;
the page must draw it with its detections, list those above the slider's threshold, and re-filter
without a new request when the slider moves. Its colours and RLE decoder are checked against
:func:`detkit.visualization.class_color` and pycocotools.

Set ``DETKIT_SCREENSHOT=docs/serve_page.png`` to also save the screenshot of the drawn page there.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from detkit.visualization import class_color
from shared_data import coco128_root, require_coco128

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
COCO128 = coco128_root()
IMAGE = "000000000009.jpg"
WAIT_S = 60

# a tiny Mask R-CNN with the coco128 class names: every proposal becomes a detection (score
# threshold 0), at most 20 per image
TINY_CONFIG = """\
model:
  meta_architecture: mask_rcnn
  num_classes: {num_classes}
  backbone: {{name: resnet18, norm: BN, freeze_at: 0}}
  fpn: {{out_channels: 32}}
  anchors: {{sizes: [[16], [32], [64], [128], [256]]}}
  rpn: {{pre_nms_topk_test: 100, post_nms_topk_test: 30}}
  roi_heads:
    score_thresh_test: 0.0
    detections_per_image: 20
    box_head: {{fc_dim: 64}}
    mask_head: {{conv_dim: 16, num_conv: 1}}
data:
  class_names: {class_names}
input: {{min_size_test: 96, max_size_test: 128}}
"""


def _require_browser() -> None:
    """Skip, naming what is missing, unless Chromium, its driver and selenium are all installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian packages chromium and chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
    pytest.importorskip("uvicorn", reason="uvicorn is not installed: pip install -e '.[serve]'")
    pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e '.[serve]'")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_predictor(root: Path, class_names: list[str]) -> Any:
    """A Predictor of the tiny config with seeded random weights: scores spread over about 0.2..1,
    masks cover most of their box."""
    from detkit.config import load_config
    from detkit.models.build import build_detector
    from detkit.inference.predictor import Predictor

    cfg_path = root / "tiny_page.yaml"
    cfg_path.write_text(
        TINY_CONFIG.format(num_classes=len(class_names), class_names=json.dumps(class_names)), encoding="utf-8"
    )
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = build_detector(cfg, len(class_names))
    with torch.no_grad():
        # wider class logits than the default init: confident and unsure detections alike
        model.roi_heads.box_predictor.cls_score.weight.normal_(0.0, 0.3)
        model.roi_heads.box_predictor.cls_score.bias.normal_(0.0, 1.0)
        model.roi_heads.mask_head.predictor.bias.fill_(0.05)  # masks that fill most of their box
    return Predictor(cfg, weights=model.state_dict())


class _Server:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a background thread."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="test-serve-page", daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=WAIT_S)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The app on a free port; ``predict_posts`` counts the POSTs to /v1/predict it received."""
    _require_browser()
    require_coco128("annotations.json", f"images/{IMAGE}")
    from detkit.serve.app import create_app
    from detkit.serve.settings import ServeOptions

    categories = json.loads((COCO128 / "annotations.json").read_text(encoding="utf-8"))["categories"]
    class_names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    predictor = _tiny_predictor(tmp_path_factory.mktemp("serve_page"), class_names)
    app = create_app(predictor, ServeOptions(max_batch=1, max_wait_ms=0.0))
    counts = {"predict_posts": 0}

    @app.middleware("http")
    async def count_predict_posts(request: Any, call_next: Any) -> Any:
        if request.method == "POST" and request.url.path == "/v1/predict":
            counts["predict_posts"] += 1
        return await call_next(request)

    with _Server(app, _free_port()) as server:
        yield {"url": server.url, "counts": counts, "class_names": class_names}


@pytest.fixture(scope="module")
def driver(served: dict[str, Any]) -> Iterator[Any]:
    """Headless Chromium of the system (no Selenium Manager download: both paths are given)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_script_timeout(WAIT_S)
    try:
        yield drv
    finally:
        drv.quit()


def _open_page(driver: Any, url: str) -> None:
    """Load the page and wait until it has read /v1/model."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.execute_script("return !!window.detkitPage")
        and "Loading" not in d.find_element("id", "model").text
    )


def _upload(driver: Any, path: Path) -> None:
    driver.find_element("id", "file-input").send_keys(str(path.resolve()))


def _rows(driver: Any) -> int:
    return len(driver.find_elements("css selector", "#detections tr"))


def _set_threshold(driver: Any, value: float) -> float:
    """Move the slider as a user would (value + 'input' event); return the value it took."""
    return float(driver.execute_script(
        "const s = document.getElementById('threshold'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input', {bubbles: true})); return s.value;", str(value)
    ))


def _canvas_rgb(driver: Any) -> np.ndarray:
    """The canvas pixels as uint8 [H, W, 3] RGB."""
    w, h, data = driver.execute_script(
        "const c = document.getElementById('canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return [c.width, c.height, btoa(Array.from(d, (v) => String.fromCharCode(v)).join(''))];"
    )
    rgba = np.frombuffer(base64.b64decode(data), np.uint8).reshape(h, w, 4)
    return rgba[..., :3]


def _edge_share(drawn: np.ndarray, box: list[float], colour: np.ndarray) -> float:
    """Largest share of one box edge's pixels (+-1 px) that have ``colour``."""
    h, w = drawn.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = (min(max(v, 0), w - 1) for v in (x1, x2))
    y1, y2 = (min(max(v, 0), h - 1) for v in (y1, y2))
    best = 0.0
    for d in (-1, 0, 1):
        for col in (x1 + d, x2 + d):
            col = min(max(col, 0), w - 1)
            best = max(best, float((drawn[y1 : y2 + 1, col] == colour).all(axis=1).mean()))
        for row in (y1 + d, y2 + d):
            row = min(max(row, 0), h - 1)
            best = max(best, float((drawn[row, x1 : x2 + 1] == colour).all(axis=1).mean()))
    return best


def _count_at_least(scores: list[float], thresh: float) -> int:
    return sum(1 for s in scores if s >= thresh)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_page_draws_lists_and_filters_without_a_new_request(
    served: dict[str, Any], driver: Any, tmp_path: Path
) -> None:
    import pycocotools.mask as mask_util
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(driver, served["url"])
    image_path = COCO128 / "images" / IMAGE
    before = served["counts"]["predict_posts"]
    _upload(driver, image_path)
    error = driver.find_element("id", "error")
    WebDriverWait(driver, WAIT_S).until(lambda d: _rows(d) > 0 or error.is_displayed())
    assert not error.is_displayed(), error.text
    result = driver.execute_script("return window.detkitPage.lastResult")
    assert served["counts"]["predict_posts"] == before + 1
    assert driver.execute_script("return window.detkitPage.predictRequests") == 1

    # the answer the page got: the image's size, masks asked for (the model has them)
    with Image.open(image_path) as im:
        original = np.asarray(im.convert("RGB"))
    height, width = original.shape[:2]
    assert (result["width"], result["height"]) == (width, height)
    scores = result["scores"]
    assert len(result["masks"]) == len(scores) == len(result["boxes"]) > 0

    # the table lists exactly the detections at or above the slider, best first
    thresh = float(driver.find_element("id", "threshold").get_attribute("value"))
    shown = _count_at_least(scores, thresh)
    assert 0 < shown < len(scores), "the seeded model should give scores on both sides of the default"
    assert _rows(driver) == shown
    assert driver.find_element("id", "threshold-value").text == f"{thresh:.2f}"
    first = driver.find_elements("css selector", "#detections tr")[0].find_elements("tag name", "td")
    assert first[1].text == result["class_names"][0]
    assert float(first[2].text) == pytest.approx(scores[0], abs=5e-4)

    # latency: the server's total time, as a number
    latency = driver.find_element("id", "latency").text
    shown_ms = re.match(r"([0-9]+\.[0-9]) ms total", latency)
    assert shown_ms, latency
    assert float(shown_ms.group(1)) == pytest.approx(result["timing"]["total_ms"], abs=0.051)
    assert f"batch {result['timing']['batch_size']}" in latency
    assert driver.find_element("id", "image-size").text == f"{width} × {height}"

    # the canvas: the image at full size with each shown box's edge in its class colour
    drawn = _canvas_rgb(driver)
    assert drawn.shape == original.shape
    visible = [i for i, s in enumerate(scores) if s >= thresh]
    for i in visible:
        colour = np.array(class_color(result["labels"][i]), np.uint8)
        share = _edge_share(drawn, result["boxes"][i], colour)
        assert share > 0.5, f"detection {i}: only {share:.0%} of its best edge has the class colour"
    # the image shows where nothing is drawn (browsers' JPEG decoding may differ from PIL's by a few
    # levels); a masked pixel is blended half and half with the colour of the best visible detection
    # whose mask covers it (masks are drawn in increasing score order)
    rles = [{"size": m["size"], "counts": m["counts"].encode("ascii")} for m in result["masks"]]
    masks = mask_util.decode(rles).transpose(2, 0, 1).astype(bool)  # [N, H, W]
    owner = np.full((height, width), -1)
    for i in reversed(visible):
        owner[masks[i]] = i
    covered = owner >= 0
    assert covered.any() and not covered.all()
    diff = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2)
    assert np.median(diff[~covered]) <= 8
    colours = np.array([class_color(k) for k in result["labels"]], float)
    blend = (original[covered] + colours[owner[covered]]) / 2
    assert np.median(np.abs(drawn[covered] - blend).max(axis=1)) <= 8

    # moving the slider up filters the table and the drawing on the client
    higher = sorted({round(s, 2) for s in scores if s > thresh + 0.01})
    target = higher[len(higher) // 2] if higher else 1.0
    new_thresh = _set_threshold(driver, target)
    assert new_thresh > thresh
    expected = _count_at_least(scores, new_thresh)
    WebDriverWait(driver, 5).until(lambda d: _rows(d) == expected)
    assert expected < shown
    assert driver.find_element("id", "threshold-value").text == f"{new_thresh:.2f}"
    assert served["counts"]["predict_posts"] == before + 1, "moving the slider must not send a request"
    assert driver.execute_script("return window.detkitPage.predictRequests") == 1
    redrawn = _canvas_rgb(driver)
    assert (redrawn != drawn).any(), "the drawing should change with the threshold"

    # nothing outside the app was fetched
    resources = driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert resources and all(r.startswith(served["url"] + "/") for r in resources), resources

    _set_threshold(driver, thresh)
    shot = tmp_path / "serve_page.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
    if os.environ.get("DETKIT_SCREENSHOT"):
        out = Path(os.environ["DETKIT_SCREENSHOT"])
        out.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(out))


def test_page_shows_the_servers_error_line(served: dict[str, Any], driver: Any, tmp_path: Path) -> None:
    import httpx
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"this is not an image\n")
    answer = httpx.post(served["url"] + "/v1/predict", files={"image": (bad.name, bad.read_bytes(), "text/plain")})
    assert answer.status_code == 400
    message = answer.json()["error"]

    _open_page(driver, served["url"])
    _upload(driver, bad)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element("id", "error").is_displayed())
    assert driver.find_element("id", "error").text == message
    assert _rows(driver) == 0
    assert driver.execute_script("return window.detkitPage.lastResult") is None


def test_page_colours_and_rle_decoder_match_python(served: dict[str, Any], driver: Any) -> None:
    import pycocotools.mask as mask_util

    _open_page(driver, served["url"])
    labels = list(range(len(served["class_names"])))
    colours = driver.execute_script("return arguments[0].map((k) => window.detkitPage.classColor(k))", labels)
    assert [tuple(c) for c in colours] == [class_color(k) for k in labels]

    rng = np.random.default_rng(0)
    masks = [
        rng.random((37, 53)) < 0.5,                      # many short runs
        np.zeros((300, 400), bool),                      # one long 0-run
        np.ones((300, 400), bool),                       # a long 1-run after an empty 0-run
        np.pad(np.ones((200, 150), bool), ((90, 10), (200, 50))),  # counts growing and shrinking
    ]
    for mask in masks:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        js = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        flat = driver.execute_script(
            "const m = window.detkitPage.rleToMask(arguments[0]); return m === null ? null : Array.from(m);", js
        )
        assert flat is not None, js["counts"][:40]
        np.testing.assert_array_equal(np.array(flat, bool).reshape(mask.shape), mask)
