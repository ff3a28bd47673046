"""The FastAPI app of a detection server: routes, request parsing, error answers.

Routes (the contract the page in ``detkit/serve/static/`` codes against):

* ``GET /`` -> ``static/index.html``; ``GET /static/<file>`` -> a file of ``static/``.
* ``GET /livez`` -> ``{"status": "ok"}`` while the process serves (liveness).
* ``GET /readyz`` (and ``GET /healthz``) -> ``{"status": "ok"}`` once the ``warmup`` sizes were predicted,
  503 ``{"status": "warming up"}`` before (readiness); ``/v1/predict`` answers 503 until then too.
* ``GET /v1/model`` -> architecture, classes, precision, device, a config summary (no server paths), the
  batching settings.
* ``POST /v1/predict[?masks=rle][&score_thresh=F]`` with a multipart form (file in field ``image``)
  or JSON ``{"image": "<base64>"}`` (a ``data:image/...;base64,`` prefix is accepted) ->
  ``{"width", "height", "boxes" (xyxy image pixels), "scores", "labels", "class_names",
  ["masks" (COCO compressed RLE)], "timing": {"queue_ms", "inference_ms", "total_ms", "batch_size"}}``,
  detections by decreasing score.

Every error is ``{"error": "<one line>"}``: 400 bad input, 413 over ``max_bytes`` / ``max_pixels``,
415 other content types, 503 with ``Retry-After: 1`` when the queue is full (checked before an upload is
decoded; images being decoded count against it), 500 a failed prediction (``internal error`` and a request
id; the details are in the log); the server keeps serving after each. Images are decoded in a thread pool
(at most :data:`MAX_DECODES` at once) and
predicted by the one worker thread of :class:`~detkit.serve.batcher.MicroBatcher`, so the event
loop never waits for the CPU-heavy work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Optional, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..evaluation import encode_masks
from .batcher import BatchResult, MicroBatcher, QueueFull, ShuttingDown
from .decode import ImageRejected, decode_image
from .settings import ServeOptions

__all__ = ["STATIC_DIR", "HTTPError", "create_app", "model_info", "prediction_json"]

logger = logging.getLogger("detkit")

#: the page's files (index.html, app.js, app.css), served as they are
STATIC_DIR = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
               ".ico": "image/x-icon", ".json": "application/json"}
#: bytes a request body may hold beyond the image itself (multipart boundaries and headers, JSON)
BODY_SLACK = 64 * 1024


class HTTPError(Exception):
    """An error answer: ``status``, a one-line ``message`` and extra ``headers``."""

    def __init__(self, status: int, message: str, headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


def _error(status: int, message: str, headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


#: uploads decoded at once (in the threadpool); the others wait for a slot, already counted in the queue
MAX_DECODES = 2


def model_info(predictor: Any, opts: ServeOptions) -> dict[str, Any]:
    """The body of ``GET /v1/model`` for a :class:`~detkit.inference.predictor.Predictor` (or alike)."""
    cfg = predictor.cfg
    return {
        "meta_architecture": cfg.model.meta_architecture,
        "num_classes": len(predictor.class_names),
        "class_names": list(predictor.class_names),
        "has_masks": cfg.model.meta_architecture == "mask_rcnn",
        "precision": predictor.precision,
        "device": str(predictor.device),
        "config": {  # no server paths: the config's file name without its folder
            "name": Path(opts.config).name if opts.config else None,
            "backbone": cfg.model.backbone.name,
            "min_size_test": cfg.input.min_size_test,
            "max_size_test": cfg.input.max_size_test,
            "score_thresh_test": cfg.model.roi_heads.score_thresh_test,
            "detections_per_image": cfg.model.roi_heads.detections_per_image,
        },
        "batching": {"max_batch": opts.max_batch, "max_wait_ms": opts.max_wait_ms, "queue_size": opts.queue_size},
    }


def prediction_json(result: BatchResult, class_names: Sequence[str], width: int, height: int,
                    masks: bool, score_thresh: float) -> dict[str, Any]:
    """The body of a ``POST /v1/predict`` answer (``timing.total_ms`` still 0): detections scoring at
    least ``score_thresh`` by decreasing score; RLE ``masks`` when asked for and the model has them."""
    pred = result.prediction
    keep = np.flatnonzero(pred.scores >= score_thresh)
    keep = keep[np.argsort(-pred.scores[keep], kind="stable")]
    labels = pred.labels[keep].astype(np.int64).tolist()
    body: dict[str, Any] = {
        "width": int(width),
        "height": int(height),
        "boxes": pred.boxes[keep].astype(np.float64).tolist(),
        "scores": pred.scores[keep].astype(np.float64).tolist(),
        "labels": labels,
        "class_names": [class_names[i] if 0 <= i < len(class_names) else str(i) for i in labels],
    }
    if masks and pred.masks is not None:
        m = pred.masks[keep]
        body["masks"] = encode_masks(m) if len(keep) else []
    body["timing"] = {"queue_ms": result.queue_ms, "inference_ms": result.inference_ms, "total_ms": 0.0,
                      "batch_size": result.batch_size}
    return body


def _query(params: Mapping[str, str]) -> tuple[bool, float]:
    """``(masks, score_thresh)`` of the query string; :class:`HTTPError` 400 for a bad value."""
    masks = params.get("masks")
    if masks not in (None, "", "rle", "none"):
        raise HTTPError(400, f"masks={masks}: unknown value; use masks=rle or leave it out")
    raw = params.get("score_thresh")
    thresh = 0.0
    if raw not in (None, ""):
        try:
            thresh = float(raw)
        except ValueError:
            thresh = math.nan
        if not (math.isfinite(thresh) and 0.0 <= thresh <= 1.0):
            raise HTTPError(400, f"score_thresh={raw}: not a number in [0, 1]; e.g. score_thresh=0.5")
    return masks == "rle", thresh


async def _read_body(request: Request, limit: int, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is longer than ``limit`` bytes."""
    too_large = HTTPError(413, f"request body too large: the image may have at most {max_bytes} bytes (--max-bytes)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes) -> Any:
    """An ASGI ``receive`` that gives ``body`` once (to parse an already read body as a form)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _image_from_form(request: Request, body: bytes) -> bytes:
    try:
        form = await Request(request.scope, _replay(body)).form(max_files=1, max_fields=16)
    except Exception as e:  # noqa: BLE001 - starlette raises HTTPException / MultiPartException / ValueError
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e) or type(e).__name__
        raise HTTPError(400, f"malformed multipart body ({detail}); send the file in the form field 'image'") from None
    try:
        upload = form.get("image")
        if upload is None:
            raise HTTPError(400, "missing field 'image': send the file in the multipart form field named image")
        if not isinstance(upload, UploadFile):
            raise HTTPError(400, "field 'image' is text, not a file: send the image file in it (or POST JSON "
                                 "{\"image\": \"<base64>\"})")
        return await upload.read()
    finally:
        await form.close()


def _image_from_json(body: bytes, max_bytes: int) -> bytes:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "body is not valid JSON; send {\"image\": \"<base64>\"}") from None
    if not isinstance(doc, dict) or "image" not in doc:
        raise HTTPError(400, "missing field 'image': send JSON {\"image\": \"<base64 of the image file>\"}")
    text = doc["image"]
    if not isinstance(text, str):
        raise HTTPError(400, f"field 'image' is a JSON {type(text).__name__}, not a base64 string")
    if text.startswith("data:"):
        head, comma, text = text.partition(",")
        if not comma or not head.endswith(";base64"):
            raise HTTPError(400, "field 'image': a data URL must look like data:image/png;base64,<data>")
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes + 2:
        raise HTTPError(413, f"image file too large: over the limit of {max_bytes} bytes (--max-bytes)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "field 'image' is not valid base64; encode the image file with standard base64") from None


async def _image_bytes(request: Request, opts: ServeOptions) -> bytes:
    """The uploaded image file of a predict request (multipart field ``image`` or JSON base64)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        body = await _read_body(request, opts.max_bytes + BODY_SLACK, opts.max_bytes)
        return await _image_from_form(request, body)
    if ctype == "application/json" or ctype.endswith("+json"):
        limit = (opts.max_bytes + 2) // 3 * 4 * 105 // 100 + BODY_SLACK  # base64 (+5% line breaks) and JSON
        body = await _read_body(request, limit, opts.max_bytes)
        return _image_from_json(body, opts.max_bytes)
    raise HTTPError(415, f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data with the file "
                         "in field 'image', or application/json {\"image\": \"<base64>\"}")


def create_app(predictor: Any, options: Optional[ServeOptions] = None) -> FastAPI:
    """A FastAPI app serving ``predictor``.

    Args:
        predictor: a :class:`~detkit.inference.predictor.Predictor` (or an object with its ``predict``,
            ``class_names``, ``precision``, ``device`` and ``cfg``); only the batcher's worker
            thread calls ``predict``. For one forward pass per batch its ``cfg.test.batch_size``
            should be at least ``max_batch`` (:func:`~detkit.serve.settings.build_predictor` does that).
        options: the limits and batching settings; default :class:`ServeOptions()`.

    The batcher (``app.state.batcher``) starts with the app's lifespan and is closed at its end.
    """
    opts = (options or ServeOptions()).validate()
    batch_size = getattr(getattr(predictor.cfg, "test", None), "batch_size", opts.max_batch)
    if batch_size < opts.max_batch:
        logger.warning("serve: the predictor's test.batch_size is %d < max_batch %d: a batch runs in %d forward "
                       "passes", batch_size, opts.max_batch, math.ceil(opts.max_batch / max(batch_size, 1)))
    batcher = MicroBatcher(predictor.predict, opts.max_batch, opts.max_wait_ms, opts.queue_size)
    info = model_info(predictor, opts)
    class_names = list(predictor.class_names)
    decoding = [0]  # requests decoding right now (the event loop is one thread: no lock needed)
    decode_slots = asyncio.Semaphore(MAX_DECODES)

    async def warm_up() -> None:
        """Predict one blank image per ``opts.warmup`` size through the batcher (its worker is the only
        caller of ``predict``), then say ready; a failure is logged and the server stays unready."""
        try:
            for h, w in opts.warmup:
                t0 = time.perf_counter()
                await asyncio.wrap_future(batcher.submit(np.zeros((h, w, 3), np.uint8), masks=False))
                logger.info("serve: warm-up at %dx%d took %.1f s", h, w, time.perf_counter() - t0)
            app.state.ready = True
        except Exception:  # noqa: BLE001 - the reason is in the log; /readyz keeps answering 503
            logger.exception("serve: warm-up failed; the server will not report ready")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        task = asyncio.create_task(warm_up())  # liveness answers meanwhile
        try:
            yield
        finally:
            task.cancel()
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="detkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.options = opts
    app.state.ready = not opts.warmup

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, f"bad request: {e.errors()[0].get('msg', 'invalid value') if e.errors() else e}")

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}  # liveness: the process serves requests

    @app.get("/readyz")
    @app.get("/healthz")
    async def readyz() -> JSONResponse:
        # readiness: warmed up and predicting (load balancers send traffic only then)
        if not app.state.ready:
            return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return info

    @app.get("/")
    async def index() -> Response:
        return _static_file("index.html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        return _static_file(name)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        if not app.state.ready:
            raise HTTPError(503, "server warming up (GET /readyz says when it is ready); retry shortly",
                            {"Retry-After": "1"})
        masks, score_thresh = _query(request.query_params)
        data = await _image_bytes(request, opts)
        # capacity before decoding: a decoded image is up to 3 x --max-pixels bytes, so images being decoded
        # count against the queue, and at most MAX_DECODES decode at once
        if batcher.waiting + decoding[0] >= opts.queue_size:
            raise HTTPError(503, f"server busy: {opts.queue_size} images are waiting for the model; retry shortly",
                            {"Retry-After": "1"})
        decoding[0] += 1
        try:
            async with decode_slots:
                image = await run_in_threadpool(decode_image, data, opts.max_bytes, opts.max_pixels)
            future = batcher.submit(image, masks=masks)  # masks are pasted only for ?masks=rle
        except ImageRejected as e:
            raise HTTPError(e.status, e.message) from None
        except (QueueFull, ShuttingDown) as e:
            raise HTTPError(503, f"server busy: {e}", {"Retry-After": "1"}) from None
        finally:
            decoding[0] -= 1
        try:
            result = await asyncio.wrap_future(future)
        except ShuttingDown as e:
            raise HTTPError(503, str(e), {"Retry-After": "1"}) from None
        except Exception:  # noqa: BLE001 - a failed prediction is answered, the server keeps serving
            # the details (which may hold paths, shapes, library internals) go to the log only, under an id
            # the client gets too
            request_id = uuid.uuid4().hex[:16]
            logger.exception("serve: prediction failed (request id %s)", request_id)
            raise HTTPError(500, f"internal error (request id {request_id}); the server log has the details",
                            {"X-Request-ID": request_id}) from None
        body = await run_in_threadpool(prediction_json, result, class_names, image.shape[1], image.shape[0],
                                       masks, score_thresh)
        body["timing"]["total_ms"] = (time.perf_counter() - t0) * 1000.0
        return JSONResponse(body)

    return app


def _static_file(name: str) -> Response:
    """A file directly inside :data:`STATIC_DIR` (no sub-folders, no hidden files), else 404 JSON."""
    path = STATIC_DIR / name
    if name.startswith(".") or "/" in name or "\\" in name or not path.is_file():
        return _error(404, f"no such page file: {name}")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                        headers={"Cache-Control": "no-cache"})
