"""The HTTP API of tools/serve.py (detkit.serve) through FastAPI's test client, with a tiny
random-weight Mask R-CNN: predictions equal :class:`~detkit.inference.predictor.Predictor` called directly,
every bad input gets its 4xx and a one-line JSON error (and the server keeps serving), decoding
equals training's :func:`~detkit.data.images.read_image`, a full queue answers 503, concurrent
requests are micro-batched without two batches overlapping; and tools/serve.py end to end."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e '.[serve]'")
pytest.importorskip("python_multipart", reason="python-multipart is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from tiny_configs import TINY_MASK_RCNN  # noqa: E402

from detkit.data.images import read_image  # noqa: E402
from detkit.serve.app import STATIC_DIR, create_app  # noqa: E402
from detkit.serve.decode import decode_image  # noqa: E402
from detkit.serve.settings import ServeOptions, build_predictor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "serve.py"
H, W = 96, 128
MAX_BYTES, MAX_PIXELS = 100_000, 50_000  # the main app's limits: the test images are ~12k pixels, ~40 kB

# a tiny Mask R-CNN that needs no data: every proposal may become a detection (score threshold 0)
# the shared tiny Mask R-CNN, keeping every detection (up to 6) however low its score
TINY_CONFIG = TINY_MASK_RCNN.replace("    detections_per_image: 3\n",
                                     "    score_thresh_test: 0.0\n    detections_per_image: 6\n")


# ---------------------------------------------------------------- images
def png(img: np.ndarray) -> bytes:
    """PNG bytes of an RGB (or gray) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def jpeg(img: np.ndarray, orientation: Optional[int] = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(img).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(png(np.zeros((1, 1), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # CRC of the chunk type + data
    return bytes(data)


def random_image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """Smooth random blobs (compress to a few kB) plus mild noise: RGB uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def converted_files(root: Path) -> dict[str, Path]:
    """Files read_image must convert: EXIF-rotated JPEG, gray, RGBA and 16-bit PNGs (written by OpenCV/PIL)."""
    rgb = random_image(7)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    files = {"exif": root / "exif6.jpg", "gray": root / "gray.png", "rgba": root / "rgba.png",
             "16bit": root / "deep.png"}
    files["exif"].write_bytes(jpeg(rgb, orientation=6))
    cv2.imwrite(str(files["gray"]), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    alpha = np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))
    cv2.imwrite(str(files["rgba"]), np.dstack([bgr, alpha]))
    cv2.imwrite(str(files["16bit"]), bgr.astype(np.uint16) * 257 + np.arange(W, dtype=np.uint16)[None, :, None])
    return files


# ---------------------------------------------------------------- predictors and apps
class RecordingPredictor:
    """Forwards to a real Predictor; records each batch's size and how many batches ran at once.

    ``gate``: when given, ``predict`` blocks until it is set (``entered`` tells that it waits);
    ``fail_first``: the first call raises.
    """

    def __init__(self, inner: Any, gate: Optional[threading.Event] = None, fail_first: bool = False) -> None:
        self.inner, self.gate, self.fail_first = inner, gate, fail_first
        self.cfg, self.class_names, self.precision, self.device = inner.cfg, inner.class_names, inner.precision, \
            inner.device
        self.batches: list[int] = []
        self.batch_shapes: list[set[tuple[int, ...]]] = []
        self.mask_flags: list[list[bool]] = []
        self.active = self.max_active = 0
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def predict(self, images: Sequence[np.ndarray], masks=True) -> list:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.batches.append(len(images))
            self.batch_shapes.append({im.shape for im in images})
            fail, self.fail_first = self.fail_first, False
        try:
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(60), "the test never opened the gate"
            if fail:
                raise RuntimeError("simulated model failure")
            self.mask_flags.append(list(masks))
            return self.inner.predict(images, masks=masks)
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def config_path(root: Path) -> Path:
    path = root / "tiny.yaml"
    path.write_text(TINY_CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def predictor(config_path: Path) -> Any:
    import torch

    torch.manual_seed(0)
    return build_predictor(ServeOptions(config=str(config_path), max_batch=4))


def options(config_path: Path, **kw: Any) -> ServeOptions:
    base = dict(config=str(config_path), max_batch=4, max_wait_ms=5.0, queue_size=8, max_bytes=MAX_BYTES,
                max_pixels=MAX_PIXELS)
    return ServeOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def client(predictor: Any, config_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(predictor, options(config_path))) as c:
        yield c


def post_file(c: TestClient, data: bytes, query: str = "", name: str = "image.png") -> Any:
    return c.post(f"/v1/predict{query}", files={"image": (name, data, "application/octet-stream")})


def post_b64(c: TestClient, data: bytes, prefix: str = "") -> Any:
    return c.post("/v1/predict", json={"image": prefix + base64.b64encode(data).decode("ascii")})


def assert_matches(body: dict, expected: Any, class_names: Sequence[str], size: tuple[int, int]) -> None:
    """A /v1/predict answer equals a Prediction of an image of ``size`` (H, W)."""
    assert (body["height"], body["width"]) == size
    assert len(expected) > 0, "the tiny model should detect something"
    np.testing.assert_allclose(np.array(body["boxes"]).reshape(-1, 4), expected.boxes, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(body["scores"], expected.scores, atol=1e-4)
    assert body["labels"] == expected.labels.tolist()
    assert body["class_names"] == [class_names[i] for i in expected.labels]
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert set(body["timing"]) == {"queue_ms", "inference_ms", "total_ms", "batch_size"}
    assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0


def assert_error(r: Any, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], body
    for n in needles:
        assert n in body["error"], body["error"]


def assert_still_serving(c: TestClient) -> None:
    r = post_file(c, png(random_image(1)))
    assert r.status_code == 200, r.text
    assert len(r.json()["boxes"]) > 0


# ---------------------------------------------------------------- the happy paths
def test_multipart_json_and_data_url_equal_predictor(client: TestClient, predictor: Any) -> None:
    img = random_image(0)
    expected = predictor(img)
    data = png(img)
    for r in (post_file(client, data), post_b64(client, data), post_b64(client, data, "data:image/png;base64,")):
        assert r.status_code == 200, r.text
        assert "masks" not in r.json()
        assert_matches(r.json(), expected, predictor.class_names, (H, W))


def test_masks_rle_decode_to_predictor_masks(client: TestClient, predictor: Any) -> None:
    img = random_image(2)
    expected = predictor(img)
    body = post_file(client, png(img), "?masks=rle").json()
    assert_matches(body, expected, predictor.class_names, (H, W))
    assert len(body["masks"]) == len(expected)
    assert all(m["size"] == [H, W] and isinstance(m["counts"], str) for m in body["masks"])
    decoded = np.stack([mask_util.decode({"size": m["size"], "counts": m["counts"].encode()}) for m in body["masks"]])
    assert decoded.any(), "the tiny model's masks should not all be empty"
    np.testing.assert_array_equal(decoded.astype(bool), expected.masks)


def test_masks_are_pasted_only_for_requests_that_ask(predictor: Any, config_path: Path) -> None:
    stub = RecordingPredictor(predictor)
    with TestClient(create_app(stub, options(config_path, max_batch=1))) as c:
        assert "masks" not in post_file(c, png(random_image(0))).json()
        assert len(post_file(c, png(random_image(0)), "?masks=rle").json()["masks"]) >= 0
        assert "masks" not in post_file(c, png(random_image(0)), "?masks=none").json()
    assert stub.mask_flags == [[False], [True], [False]]


def test_score_thresh_filters_on_the_server(client: TestClient, predictor: Any) -> None:
    img = random_image(3)
    expected = predictor(img)
    thresh = float(np.median(expected.scores))
    body = post_file(client, png(img), f"?score_thresh={thresh!r}").json()
    keep = expected.scores >= thresh
    assert 0 < keep.sum() < len(expected)
    np.testing.assert_allclose(body["scores"], expected.scores[keep], atol=1e-4)
    np.testing.assert_allclose(np.array(body["boxes"]).reshape(-1, 4), expected.boxes[keep], atol=1e-4)


def test_model_healthz_and_page(client: TestClient, predictor: Any, config_path: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    cfg = predictor.cfg
    assert info["meta_architecture"] == "mask_rcnn" and info["has_masks"] is True
    assert info["num_classes"] == 3 and info["class_names"] == ["circle", "rectangle", "triangle"]
    assert info["precision"] == predictor.precision and info["device"] == "cpu"
    assert str(config_path.parent) not in json.dumps(info)  # no server paths
    assert info["config"] == {"name": config_path.name, "backbone": "resnet18", "min_size_test": 96,
                              "max_size_test": 128, "score_thresh_test": 0.0,
                              "detections_per_image": cfg.model.roi_heads.detections_per_image}
    assert info["batching"] == {"max_batch": 4, "max_wait_ms": 5.0, "queue_size": 8}
    assert cfg.test.batch_size == 4, "build_predictor must make a batch one forward pass"

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == (STATIC_DIR / "index.html").read_bytes()
    for f in sorted(STATIC_DIR.iterdir()):
        r = client.get(f"/static/{f.name}")
        assert r.status_code == 200 and r.content == f.read_bytes(), f.name
    assert_error(client.get("/static/missing.js"), 404, "missing.js")
    assert client.get("/static/..%2Fapp.py").status_code == 404
    assert_error(client.get("/v1/nothing"), 404)


# ---------------------------------------------------------------- bad input
def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def noise_image(h: int, w: int) -> np.ndarray:
    """Uniform noise: a PNG of it is about 3 bytes per pixel (200x200: ~120 kB > MAX_BYTES, < MAX_PIXELS)."""
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


# case -> (send it with the client, expected status, a part of the error message)
BAD_INPUTS = {
    "not an image": (lambda c: post_file(c, b"hello, I am plain text\n" * 20), 400, "not an image"),
    "truncated JPEG": (lambda c: post_file(c, first_half(jpeg(random_image(4)))), 400, "truncated JPEG"),
    "truncated PNG": (lambda c: post_file(c, first_half(png(random_image(4)))), 400, "truncated PNG"),
    "empty file": (lambda c: post_file(c, b""), 400, "empty"),
    "bad base64": (lambda c: c.post("/v1/predict", json={"image": "iVBOR%%%not base64"}), 400, "base64"),
    "base64 of text": (lambda c: post_b64(c, b"just text"), 400, "not an image"),
    "bad data URL": (lambda c: c.post("/v1/predict", json={"image": "data:image/png,abc"}), 400,
                     "data URL"),
    "invalid JSON": (lambda c: c.post("/v1/predict", content=b"{image:",
                                                 headers={"content-type": "application/json"}), 400, "JSON"),
    "JSON without image": (lambda c: c.post("/v1/predict", json={"picture": "abc"}), 400,
                           "missing field 'image'"),
    "form without image": (lambda c: c.post("/v1/predict", files={"file": ("a.png", b"x")}), 400,
                           "missing field 'image'"),
    "form image as text": (lambda c: c.post("/v1/predict", files={"image": (None, "abc")}), 400,
                           "not a file"),
    "bad masks value": (lambda c: post_file(c, png(random_image(5)), "?masks=png"), 400, "masks=png"),
    "bad score_thresh": (lambda c: post_file(c, png(random_image(5)), "?score_thresh=high"), 400,
                         "score_thresh=high"),
    "unsupported type": (lambda c: c.post("/v1/predict", content=png(random_image(5)),
                                                     headers={"content-type": "image/png"}), 415, "image/png"),
    "over max-bytes": (lambda c: post_file(c, png(noise_image(200, 200))), 413, "--max-bytes"),
    "over max-bytes base64": (lambda c: post_b64(c, bytes(MAX_BYTES + 10)), 413, "--max-bytes"),
    "over max-bytes body": (lambda c: post_file(c, bytes(3 * MAX_BYTES)), 413, "--max-bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_answers_4xx_and_keeps_serving(case: str, client: TestClient) -> None:
    send, status, needle = BAD_INPUTS[case]
    assert_error(send(client), status, needle)
    assert_still_serving(client)


@pytest.mark.parametrize("data,needle", [(png_claiming(30_000, 30_000), "too large"),  # PIL's own bomb limit
                                         (png(np.full((400, 400), 7, np.uint8)), "--max-pixels")],
                         ids=["bomb header", "over max-pixels"])
def test_over_max_pixels_is_413_without_decoding(data: bytes, needle: str, client: TestClient,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(data) < MAX_BYTES
    calls: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_error(post_file(client, data), 413, needle)
    assert not calls, "the pixels were decoded before the size was refused"
    assert_still_serving(client)
    assert calls, "the spy should see normal decodes"


# ---------------------------------------------------------------- conversions (same as training's reader)
@pytest.mark.parametrize("kind", ["exif", "gray", "rgba", "16bit"])
def test_decode_equals_read_image_and_predicts_the_same(kind: str, tmp_path: Path, client: TestClient,
                                                        predictor: Any) -> None:
    path = converted_files(tmp_path)[kind]
    expected_img = read_image(path)
    data = path.read_bytes()
    decoded = decode_image(data, MAX_BYTES, MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == expected_img.shape
    np.testing.assert_array_equal(decoded, expected_img)
    if kind == "exif":
        assert expected_img.shape[:2] == (W, H), "orientation 6 turns the stored 96x128 image upright"
    body = post_file(client, data).json()
    assert_matches(body, predictor(expected_img), predictor.class_names, expected_img.shape[:2])


# ---------------------------------------------------------------- tools/serve.py end to end
def test_tool_serves_over_http_and_stops_on_ctrl_c(config_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(TOOL), "--config", str(config_path), "--port", "0",
                             "--max-batch", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        assert lines and "serving" in lines[0], (lines, proc.poll())
        url = re.search(r"http://127\.0\.0\.1:\d+/", lines[0])
        assert url, lines[0]
        base = url.group(0)
        with urllib.request.urlopen(base + "livez", timeout=60) as r:
            assert json.load(r) == {"status": "ok"}
        deadline, ready = time.monotonic() + 120, None
        while ready is None and time.monotonic() < deadline:  # the default warm-up: 480x640 and 640x480
            try:
                with urllib.request.urlopen(base + "readyz", timeout=60) as r:
                    ready = json.load(r)
            except urllib.error.HTTPError as e:
                assert e.code == 503
                time.sleep(0.1)
        assert ready == {"status": "ok"}
        body = json.dumps({"image": base64.b64encode(png(random_image(0))).decode()}).encode()
        req = urllib.request.Request(base + "v1/predict", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
        assert (answer["height"], answer["width"]) == (H, W) and len(answer["boxes"]) > 0
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
        err = proc.stderr.read()
        assert rc in (0, 130) and "Traceback" not in err, (rc, err)  # 130: run_cli's "interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
