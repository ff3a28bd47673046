#!/usr/bin/env python
"""Serve a trained detector over HTTP, with micro-batching of concurrent requests.

Needs the ``serve`` extra: ``pip install -e ".[serve]"`` (FastAPI, uvicorn, python-multipart).
The page at ``/`` lets you upload an image and see the detections; programs POST images to
``/v1/predict``. Concurrent requests share forward passes: a batch holds at most ``--max-batch``
images and waits at most ``--max-wait-ms`` for them; when ``--queue-size`` images already wait
the server answers 503 with ``Retry-After: 1``. The work is done by :mod:`detkit.serve`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from detkit.serve.limits import DEFAULT_MAX_PIXELS, limit_opencv_pixels, max_pixels_arg

limit_opencv_pixels(max_pixels_arg(sys.argv[1:]))  # before anything loads OpenCV, which reads its limit once

from detkit.cli import run_cli  # noqa: E402

DEFAULT_WARMUP = ["480x640", "640x480"]

EPILOG = """examples:
  # serve a trained model on http://127.0.0.1:8000/ (open it in a browser)
  python tools/serve.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth
  # on every interface, port 8080, bfloat16, batches of up to 8 images
  python tools/serve.py --config runs/mine/config.yaml --weights best.pth --host 0.0.0.0 --port 8080 \\
      --precision bf16 --max-batch 8 input.min_size_test=640
  # ask it from the command line
  curl -F image=@photo.jpg 'http://127.0.0.1:8000/v1/predict?score_thresh=0.5'
  curl -F image=@photo.jpg 'http://127.0.0.1:8000/v1/predict?masks=rle'
  curl http://127.0.0.1:8000/v1/model
  # int8, ready only once the sizes your clients send are compiled
  python tools/serve.py --config runs/mine/config.yaml --weights best.pth --precision int8 \\
      --warmup 720x1280 --warmup 1280x720
  curl -f http://127.0.0.1:8000/readyz   # 503 while warming up; /livez answers at once

POST /v1/predict takes a multipart form with the file in field "image", or JSON {"image": "<base64>"},
and answers {"width", "height", "boxes" [[x1, y1, x2, y2], ...] (image pixels), "scores", "labels",
"class_names", "masks" (COCO RLE, with ?masks=rle), "timing"}. Errors are {"error": "..."} with
status 400 (not an image, truncated), 413 (over --max-bytes / --max-pixels), 415 or 503 (busy).
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/serve.py``."""
    p = argparse.ArgumentParser(
        prog="tools/serve.py",
        description=__doc__.strip().splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config of the model (e.g. runs/mine/config.yaml)")
    p.add_argument("--weights", default=None, help="checkpoint file, or a name: torchvision://..., detectron2://..., "
                   "https://... (default: the config's model.weights)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"], default=None,
                   help="inference precision (default: the config's test.precision)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    p.add_argument("--max-batch", type=int, default=4, help="most images per forward pass (default: 4; 1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more images after its first (default: 10)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="most images waiting for the model; more are answered 503 (default: 16); they wait "
                        "decoded, so they can take queue-size x max-pixels x 3 bytes")
    p.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024,
                   help="largest image file accepted, in bytes (default: 20 MiB; larger: 413)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest width x height accepted, read from the header before decoding (default: 25M)")
    p.add_argument("--warmup", action="append", default=None, metavar="HxW",
                   help="an image size predicted once before /readyz says ready; repeat it for more (default: "
                        "480x640 and 640x480; int8 compiles its size buckets then; 'none': ready at once)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input.min_size_test=640")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve as the command line says (errors: see :func:`detkit.cli.run_cli`)."""
    args = parse_args(argv)
    from detkit.serve.settings import ServeOptions, check_serve_extra, parse_sizes  # after parsing: --help stays instant

    check_serve_extra()
    from detkit.serve.server import serve

    serve(ServeOptions(
        config=args.config, weights=args.weights, device=args.device, precision=args.precision, host=args.host,
        port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
        max_bytes=args.max_bytes, max_pixels=args.max_pixels, overrides=tuple(args.overrides),
        warmup=parse_sizes([v for v in args.warmup or DEFAULT_WARMUP if v != "none"], "--warmup"),
    ))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="serve.py", keep_freed_memory=True))  # inference: malloc kept warm
