"""The server under load: micro-batching, the bounded queue (checked before decoding), the decode limit,
readiness after warm-up, and a failed prediction answered without its details. Split from test_serve.py,
whose helpers and fixtures it uses."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve import (  # noqa: E402,F401 - the fixtures are used by name
    H, W, RecordingPredictor, assert_error, assert_matches, assert_still_serving, config_path, options, png,
    post_file, predictor, random_image, root,
)

from detkit.serve.app import create_app  # noqa: E402


# ---------------------------------------------------------------- batching and the queue
def concurrent_posts(c: TestClient, payloads: Sequence[bytes]) -> list[Any]:
    """POST every payload from its own thread, all released at once; the responses in order."""
    out: list[Any] = [None] * len(payloads)
    barrier = threading.Barrier(len(payloads))

    def send(i: int) -> None:
        barrier.wait()
        out[i] = post_file(c, payloads[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_requests_are_batched(predictor: Any, config_path: Path) -> None:
    stub = RecordingPredictor(predictor)
    images = [random_image(10 + i) for i in range(8)]
    # a generous wait: the first batch waits until 4 images are there, so batching does not hang on timing
    with TestClient(create_app(stub, options(config_path, max_batch=4, max_wait_ms=10_000))) as c:
        responses = concurrent_posts(c, [png(im) for im in images])
    assert [r.status_code for r in responses] == [200] * 8
    assert sum(stub.batches) == 8 and max(stub.batches) <= 4
    assert max(stub.batches) > 1, f"no batching: batch sizes {stub.batches}"
    assert stub.max_active == 1, "two batches ran at once"
    assert sorted(r.json()["timing"]["batch_size"] for r in responses) == sorted(
        n for n in stub.batches for _ in range(n))
    for r, im in zip(responses, images):  # batched results equal unbatched ones
        assert_matches(r.json(), predictor(im), predictor.class_names, (H, W))


def test_batches_hold_one_image_size(predictor: Any, config_path: Path) -> None:
    """The detector pads a batch to its largest image, which would change the others' detections:
    images of other sizes wait for a batch of their own, and every answer equals the unbatched one."""
    stub = RecordingPredictor(predictor)
    images = [random_image(30 + i, *((H, W) if i % 2 else (W, H))) for i in range(6)]
    with TestClient(create_app(stub, options(config_path, max_batch=4, max_wait_ms=200))) as c:
        responses = concurrent_posts(c, [png(im) for im in images])
    assert [r.status_code for r in responses] == [200] * 6
    assert sum(stub.batches) == 6 and max(stub.batches) <= 4 and stub.max_active == 1
    assert all(len(shapes) == 1 for shapes in stub.batch_shapes), stub.batch_shapes
    for r, im in zip(responses, images):
        assert_matches(r.json(), predictor(im), predictor.class_names, im.shape[:2])


def test_full_queue_answers_503_with_retry_after(predictor: Any, config_path: Path, monkeypatch) -> None:
    import detkit.serve.app as app_module

    decoded: list[int] = []
    real_decode = app_module.decode_image
    monkeypatch.setattr(app_module, "decode_image", lambda *a: decoded.append(1) or real_decode(*a))
    gate = threading.Event()
    stub = RecordingPredictor(predictor, gate=gate)
    data = png(random_image(20))
    with TestClient(create_app(stub, options(config_path, max_batch=1, queue_size=2))) as c:
        batcher = c.app.state.batcher
        results: list[Any] = []
        first = threading.Thread(target=lambda: results.append(post_file(c, data)))
        first.start()
        assert stub.entered.wait(30), "the worker never took the first request"
        waiting = [threading.Thread(target=lambda: results.append(post_file(c, data))) for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 30
        while batcher.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.waiting == 2, "the two requests never reached the queue"
        assert len(decoded) == 3
        r = post_file(c, data)
        assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        assert len(decoded) == 3, "the refused upload was decoded: the queue must be checked first"
        gate.set()
        for t in [first, *waiting]:
            t.join(60)
        assert [x.status_code for x in results] == [200, 200, 200]
        assert_still_serving(c)
    assert stub.batches == [1, 1, 1, 1] and stub.max_active == 1


def test_at_most_max_decodes_uploads_decode_at_once(predictor: Any, config_path: Path, monkeypatch) -> None:
    import detkit.serve.app as app_module

    lock, now, peak = threading.Lock(), [0], [0]
    real_decode = app_module.decode_image

    def slow_decode(*args: Any) -> np.ndarray:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.2)  # long enough for every request to arrive while others decode
            return real_decode(*args)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(app_module, "decode_image", slow_decode)
    with TestClient(create_app(predictor, options(config_path, queue_size=16))) as c:
        responses = concurrent_posts(c, [png(random_image(40 + i)) for i in range(6)])
    assert [r.status_code for r in responses] == [200] * 6
    assert peak[0] == app_module.MAX_DECODES


def test_not_ready_until_the_warmup_sizes_were_predicted(predictor: Any, config_path: Path) -> None:
    gate = threading.Event()
    stub = RecordingPredictor(predictor, gate=gate)
    with TestClient(create_app(stub, options(config_path, warmup=((64, 80), (80, 64))))) as c:
        assert stub.entered.wait(30), "the warm-up never reached the model"
        assert c.get("/livez").json() == {"status": "ok"}  # alive while warming up
        for path in ("/readyz", "/healthz"):
            r = c.get(path)
            assert r.status_code == 503 and r.json() == {"status": "warming up"} and r.headers["retry-after"] == "1"
        assert_error(post_file(c, png(random_image(0))), 503, "warming up")
        gate.set()
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").json() == {"status": "ok"} and c.get("/healthz").status_code == 200
        assert_still_serving(c)
    assert stub.batch_shapes[:2] == [{(64, 80, 3)}, {(80, 64, 3)}] and stub.mask_flags[:2] == [[False], [False]]


def test_failed_prediction_is_500_and_the_server_keeps_serving(predictor: Any, config_path: Path, caplog) -> None:
    stub = RecordingPredictor(predictor, fail_first=True)
    with TestClient(create_app(stub, options(config_path))) as c, caplog.at_level(logging.ERROR, logger="detkit"):
        r = post_file(c, png(random_image(0)))
        assert_error(r, 500, "internal error (request id ")
        assert "simulated model failure" not in r.text  # the exception stays in the server log
        request_id = r.headers["X-Request-ID"]
        assert request_id in r.json()["error"]
        logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
        assert logged and "simulated model failure" in logged[0].exc_text
        assert_still_serving(c)
