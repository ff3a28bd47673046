"""Throughput and latency of ``tools/serve.py`` under a bounded load, with micro-batching on and off.

Starts ``tools/serve.py`` twice as subprocesses on free 127.0.0.1 ports (``--port 0``) with a small
random-weight model (default: the demo Mask R-CNN R18-FPN config, test size 224/320), one with
batching on (``--max-batch 8``) and one off (``--max-batch 1``). After a warm-up it sends
``--requests`` POST /v1/predict requests (the same JPEG each time, multipart upload) to each from 1
and from 8 client threads, each thread on its own keep-alive connection, in ``--rounds`` interleaved
blocks (so that a change of the machine's load hits all rows alike), and prints one row per
(mode, concurrency): throughput (requests/s), p50 and p95 latency (ms, as the client sees it),
the mean batch size the server reported, and the error count (anything but 200), then the
speed-up batching gives at the highest concurrency. No asserts: the figures depend on the machine.

    python benchmarks/bench_serve.py [--requests 200] [--concurrency 1 8] [--max-batch 8]
        [--max-wait-ms 10] [--image photo.jpg] [--image-size 320] [--config CONFIG] [key=value ...]

The image is the first coco128 image when ../shared/data/coco128 exists, else a synthetic 480x640
JPEG, resized to 320 px on its long side (the demo model's test size, so the model's work is the
same as for the full image while decoding and mask pasting stay small). ``key=value`` config
overrides go to the server (e.g. ``input.min_size_test=320``).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "serve.py"
DEFAULT_CONFIG = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
COCO128 = ROOT.parent / "shared" / "data" / "coco128"


@dataclass
class RunResult:
    """One (mode, concurrency) run: latencies (ms) of the successful requests, errors, wall time, batch sizes."""

    mode: str
    concurrency: int
    latencies_ms: list[float]
    errors: int
    wall_s: float
    batch_sizes: list[int]

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def load_image(path: Optional[str], long_side: int) -> bytes:
    """The JPEG to send: ``path``, else the first coco128 image, else a synthetic 480x640 one; resized
    (and re-encoded) to ``long_side`` pixels on its long side unless that is 0."""
    from PIL import Image

    if path:
        data = Path(path).read_bytes()
    else:
        images = sorted((COCO128 / "images").rglob("*.jpg")) if COCO128.is_dir() else []
        if images:
            data = images[0].read_bytes()
        else:
            rng = np.random.default_rng(0)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((640, 480)).save(buf, "JPEG")
            data = buf.getvalue()
    if long_side <= 0:
        return data
    with Image.open(io.BytesIO(data)) as im:
        scale = long_side / max(im.size)
        small = im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def multipart(data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with ``data`` in the field ``image``, and its content type."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"image.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Server:
    """``tools/serve.py`` in a subprocess; ``port`` is known once it printed its startup line."""

    def __init__(self, config: str, max_batch: int, max_wait_ms: float, overrides: Sequence[str]) -> None:
        cmd = [sys.executable, str(TOOL), "--config", config, "--port", "0", "--max-batch", str(max_batch),
               "--max-wait-ms", str(max_wait_ms), "--queue-size", "256", *overrides]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"tools/serve.py did not start (exit {self.proc.wait()}): {line!r}")
        self.url = line[line.index("http://"):].split()[0]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_load(port: int, body: bytes, ctype: str, requests: int, concurrency: int, mode: str) -> RunResult:
    """Send ``requests`` requests from ``concurrency`` threads (one keep-alive connection each)."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = [0]

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                ok, payload = False, b""
            dt = (time.perf_counter() - t0) * 1000.0
            with lock:
                if ok:
                    latencies.append(dt)
                    batch_sizes.append(int(json.loads(payload)["timing"]["batch_size"]))
                else:
                    errors[0] += 1
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return RunResult(mode, concurrency, latencies, errors[0], time.perf_counter() - t0, batch_sizes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config (random weights)")
    p.add_argument("--requests", type=int, default=200, help="requests per (mode, concurrency)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="client threads")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the batching server")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="--max-wait-ms of the batching server")
    p.add_argument("--rounds", type=int, default=8, help="interleaved blocks each row's requests are split into")
    p.add_argument("--warmup", type=int, default=16, help="untimed requests before each server's runs")
    p.add_argument("--image", default=None, help="JPEG/PNG to send (default: first coco128 image or synthetic)")
    p.add_argument("--image-size", type=int, default=320,
                   help="resize the image to this long side before sending (default: 320, the model's test size; "
                        "0: as is)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the server")
    args = p.parse_args(argv)

    image = load_image(args.image, args.image_size)
    body, ctype = multipart(image)
    print(f"bench_serve: {Path(args.config).name} (random weights) {' '.join(args.overrides)}; image "
          f"{args.image_size or 'full'} px long side, {len(image) / 1024:.0f} kB JPEG; {args.requests} requests per "
          f"row; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    # both servers run side by side (an idle one waits on its queue) and the rows are measured in
    # --rounds interleaved blocks, so a change of the machine's load hits every row alike
    servers = {mode: Server(args.config, mb, args.max_wait_ms, args.overrides)
               for mode, mb in ((f"batching (max batch {args.max_batch})", args.max_batch),
                                ("no batching (max batch 1)", 1))}
    results = {(mode, conc): RunResult(mode, conc, [], 0, 0.0, []) for mode in servers for conc in args.concurrency}
    try:
        for mode, server in servers.items():
            run_load(server.port, body, ctype, args.warmup, max(args.concurrency), mode)  # warm-up
        rounds = max(1, min(args.rounds, args.requests))
        for k in range(rounds):
            block = args.requests // rounds + (1 if k < args.requests % rounds else 0)
            keys = list(results)
            for mode, conc in keys[k % len(keys):] + keys[: k % len(keys)]:  # rotate the order each round
                part = run_load(servers[mode].port, body, ctype, block, conc, mode)
                total = results[(mode, conc)]
                total.latencies_ms += part.latencies_ms
                total.batch_sizes += part.batch_sizes
                total.errors += part.errors
                total.wall_s += part.wall_s
            print(f"  round {k + 1}/{rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for server in servers.values():
            server.close()
    results = list(results.values())

    print(f"\n{'mode':<28} {'concurrency':>11} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'mean batch':>10} "
          f"{'errors':>6}")
    for r in results:
        mean_batch = statistics.fmean(r.batch_sizes) if r.batch_sizes else float("nan")
        print(f"{r.mode:<28} {r.concurrency:>11d} {r.throughput:>7.2f} {r.percentile(50):>8.1f} "
              f"{r.percentile(95):>8.1f} {mean_batch:>10.2f} {r.errors:>6d}")
    top = max(args.concurrency)
    on, off = (next(r for r in results if r.concurrency == top and r.mode.startswith(m))
               for m in ("batching", "no batching"))
    print(f"\nbatching speed-up at concurrency {top}: {on.throughput / max(off.throughput, 1e-9):.2f}x throughput "
          f"({on.throughput:.2f} vs {off.throughput:.2f} req/s); p50 latency {on.percentile(50):.0f} vs "
          f"{off.percentile(50):.0f} ms; errors total {sum(r.errors for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
