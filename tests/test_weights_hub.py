"""Weights by name (detkit.checkpoint.hub): download, cache, verify, offline, several processes.

Every file is served by an HTTP server on 127.0.0.1 that the test starts; nothing reaches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torchvision
import yaml
from tiny_configs import SMALL_MASK_RCNN

from detkit import Predictor
from detkit.checkpoint import CheckpointError, load_initial_weights
from detkit.checkpoint.hub import (
    DETECTRON2_ZOO_PREFIX,
    cache_dir,
    cached_path,
    fetch_weights,
    is_weights_name,
    parse_weights_name,
)
from detkit.config import load_config
from detkit.inference.runner import build_predictor
from detkit.models import build_detector

REPO = Path(__file__).resolve().parents[1]


def _named(content: bytes, stem: str = "resnet") -> str:
    """torchvision's file naming: ``<stem>-<first 8 hex digits of the SHA-256>.pth``."""
    return f"{stem}-{hashlib.sha256(content).hexdigest()[:8]}.pth"


class _Files:
    """What the test server serves, and which paths it was asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()  # announce the full length, send half, close
        self.delay_s: dict[str, float] = {}
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()


@pytest.fixture()
def server() -> Iterator[tuple[str, _Files]]:
    files = _Files()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with files.lock:
                files.requests[self.path] += 1
            body = files.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            time.sleep(files.delay_s.get(self.path, 0.0))
            if self.path in files.truncated:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def detkit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "detkit_home"
    monkeypatch.setenv("DETKIT_HOME", str(home))
    monkeypatch.delenv("DETKIT_OFFLINE", raising=False)
    return home


def _leftovers(root: Path) -> list[str]:
    """Files in the cache other than complete downloads and lock files."""
    return sorted(p.name for p in root.rglob("*") if p.is_file() and p.suffix == ".part")


# --------------------------------------------------------------------------- names
def test_names_resolve_to_urls_without_network() -> None:
    wn = parse_weights_name("torchvision://ResNet50_Weights.IMAGENET1K_V2")
    from torchvision.models import ResNet50_Weights

    assert wn.url == ResNet50_Weights.IMAGENET1K_V2.url
    assert wn.sha256_prefix and wn.url.rsplit("/", 1)[-1].endswith(f"-{wn.sha256_prefix}.pth")
    assert wn.convention is not None and wn.convention.channels == "RGB"

    d2 = parse_weights_name("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    assert d2.url == DETECTRON2_ZOO_PREFIX + "ImageNetPretrained/MSRA/R-50.pkl"
    assert d2.sha256_prefix is None  # "-50." is a depth, not a hash
    assert d2.convention is not None and d2.convention.channels == "BGR" and d2.stride_in_1x1 is True
    zoo = parse_weights_name("detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/"
                             "model_final_f10217.pkl")
    assert zoo.convention is None  # the zoo file states its own pixel_mean / pixel_std

    assert is_weights_name("https://x/y.pth") and is_weights_name("torchvision://") and not is_weights_name("a/b.pth")
    expected = cache_dir() / "example.org" / "a" / "b" / "c-0123abcd.pth"
    assert cached_path("https://example.org/a/b/c-0123abcd.pth") == expected


@pytest.mark.parametrize("name, says", [
    ("torchvision://ResNet50_Weights.NO_SUCH", "not a weights enum member"),
    ("torchvision://", "alone names the weights of a configs/torchvision/ config"),
    ("detectron2://", "names no file"),
])
def test_bad_names_get_one_line(name: str, says: str) -> None:
    with pytest.raises(CheckpointError) as e:
        parse_weights_name(name)
    assert "\n" not in str(e.value) and says in str(e.value), str(e.value)


@pytest.mark.parametrize("config, member", [
    ("faster_rcnn_R_50_FPN.yaml", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"),
    ("faster_rcnn_R_50_FPN_v2.yaml", "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"),
    ("mask_rcnn_R_50_FPN.yaml", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"),
    ("mask_rcnn_R_50_FPN_v2.yaml", "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"),
])
def test_bare_torchvision_name_picks_the_configs_file(config: str, member: str, detkit_home: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.weights=torchvision://`` with a configs/torchvision config: that config's COCO file, verified by
    its hash; a wrong file placed in the cache is refused and removed (offline, so nothing is fetched)."""
    cfg = load_config(REPO / "configs" / "torchvision" / config, ["model.weights=torchvision://"])
    url = torchvision.models.get_weight(member).url
    placed = cached_path(url)
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"not the weights")
    monkeypatch.setenv("DETKIT_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_initial_weights(torch.nn.Identity(), cfg, training=False)  # refused before any model is touched
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "SHA-256" in msg and "removed" in msg, msg
    assert not placed.exists()


# --------------------------------------------------------------------------- download, cache, verify
def test_good_file_is_downloaded_once_then_cached(server: tuple[str, _Files]) -> None:
    base, files = server
    body = os.urandom(3 << 20)
    path = f"/models/{_named(body)}"
    files.files[path] = body
    wn = parse_weights_name(base + path)
    assert wn.sha256_prefix == hashlib.sha256(body).hexdigest()[:8]
    got = fetch_weights(wn)
    assert got == cached_path(base + path) and got.read_bytes() == body
    assert fetch_weights(wn) == got and files.requests[path] == 1  # the second use reads the cache
    assert _leftovers(cache_dir()) == []


def test_load_weights_takes_a_url(server: tuple[str, _Files], tmp_path: Path) -> None:
    import detkit

    net = torch.nn.Linear(3, 2)
    torch.save(net.state_dict(), tmp_path / "lin.pth")
    body = (tmp_path / "lin.pth").read_bytes()
    path = f"/models/{_named(body, 'linear')}"
    server[1].files[path] = body
    fresh = torch.nn.Linear(3, 2)
    report = detkit.load_weights(fresh, server[0] + path)
    assert report.fits and torch.equal(fresh.weight, net.weight)


def test_corrupt_file_is_refused_and_not_kept(server: tuple[str, _Files]) -> None:
    base, files = server
    body = os.urandom(1 << 16)
    path = f"/models/{_named(b'other content')}"
    files.files[path] = body
    with pytest.raises(CheckpointError) as e:
        fetch_weights(parse_weights_name(base + path))
    msg = str(e.value)
    assert "\n" not in msg and base + path in msg and "SHA-256" in msg, msg
    assert not cached_path(base + path).exists() and _leftovers(cache_dir()) == []


def test_corrupt_cached_file_is_refused_and_removed(server: tuple[str, _Files]) -> None:
    base, files = server
    body = os.urandom(1 << 16)
    path = f"/models/{_named(body)}"
    files.files[path] = body
    dest = fetch_weights(parse_weights_name(base + path))
    dest.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))  # one bit flipped on disk
    with pytest.raises(CheckpointError) as e:
        fetch_weights(parse_weights_name(base + path))
    assert "SHA-256" in str(e.value) and str(dest) in str(e.value)
    assert not dest.exists()
    assert fetch_weights(parse_weights_name(base + path)).read_bytes() == body  # the next use downloads again
    assert files.requests[path] == 2


def test_interrupted_download_leaves_nothing_that_looks_complete(server: tuple[str, _Files]) -> None:
    base, files = server
    path = "/detectron2/model_final_abc.pkl"  # no hash in the name: only the length can tell
    files.files[path] = os.urandom(1 << 20)
    files.truncated.add(path)
    with pytest.raises(CheckpointError) as e:
        fetch_weights(parse_weights_name(base + path))
    msg = str(e.value)
    assert "\n" not in msg and "stopped after" in msg and base + path in msg, msg
    assert not cached_path(base + path).exists() and _leftovers(cache_dir()) == []


def test_http_error_and_no_network_name_the_url_and_the_cache_path(server: tuple[str, _Files]) -> None:
    base, _ = server
    url = base + "/models/missing.pth"
    with pytest.raises(CheckpointError) as e:
        fetch_weights(parse_weights_name(url))
    msg = str(e.value)
    assert "\n" not in msg and url in msg and str(cached_path(url)) in msg and "404" in msg, msg

    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/w.pth"
    with pytest.raises(CheckpointError) as e:
        fetch_weights(parse_weights_name(closed))
    assert closed in str(e.value) and str(cached_path(closed)) in str(e.value)


def test_offline_uses_the_cache_or_says_where_to_put_the_file(server: tuple[str, _Files],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, files = server
    body = os.urandom(1 << 16)
    path = f"/models/{_named(body)}"
    files.files[path] = body
    monkeypatch.setenv("DETKIT_OFFLINE", "1")
    wn = parse_weights_name(base + path)
    with pytest.raises(CheckpointError) as e:
        fetch_weights(wn)
    msg = str(e.value)
    assert "DETKIT_OFFLINE" in msg and base + path in msg and str(cached_path(base + path)) in msg, msg
    assert files.requests[path] == 0
    monkeypatch.delenv("DETKIT_OFFLINE")
    fetch_weights(wn)
    monkeypatch.setenv("DETKIT_OFFLINE", "1")
    assert fetch_weights(wn).read_bytes() == body and files.requests[path] == 1


_FETCH = """
import sys
from detkit.checkpoint.hub import fetch_weights, parse_weights_name
print(fetch_weights(parse_weights_name(sys.argv[1])))
"""


def test_two_processes_at_once_download_once(server: tuple[str, _Files]) -> None:
    """Two processes (two DDP ranks of a node, or two tools) ask for the same file: one downloads, the other
    waits for it and uses the cached file."""
    base, files = server
    body = os.urandom(2 << 20)
    path = f"/models/{_named(body)}"
    files.files[path] = body
    files.delay_s[path] = 1.0  # the second process starts while the first downloads
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH, base + path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert {o[0].strip() for o in outs} == {str(cached_path(base + path))}
    assert files.requests[path] == 1
    assert cached_path(base + path).read_bytes() == body and _leftovers(cache_dir()) == []


# --------------------------------------------------------------------------- where weights are accepted
def test_backbone_weights_by_url_load_into_a_detector(server: tuple[str, _Files], tmp_path: Path) -> None:
    """``model.backbone.weights=<URL>`` of a torchvision ResNet-18 file: downloaded, verified and loaded."""
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    body = (tmp_path / "r18.pth").read_bytes()
    path = f"/models/{_named(body, 'resnet18')}"
    files = server[1]
    files.files[path] = body
    cfg = load_config(REPO / "configs" / "coco" / "faster_rcnn_R_18_FPN_1x.yaml",
                      [f"model.backbone.weights={server[0] + path}"])
    model = build_detector(cfg, 3)
    (report,) = load_initial_weights(model, cfg, training=True)
    assert report.source_format == "torchvision classification" and not report.missing
    assert torch.equal(model.backbone.bottom_up.res5[1].conv2.weight, net.layer4[1].conv2.weight)


def test_infer_tool_takes_a_url_for_weights(server: tuple[str, _Files], tmp_path: Path) -> None:
    """``tools/infer.py --weights <URL>`` (the tools' shared Predictor builder): the named checkpoint, not random
    weights, and the tool's "no such file" check lets a name through."""
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL_MASK_RCNN))
    torch.manual_seed(3)
    model = build_detector(load_config(config), 3)
    torch.save({"model": model.state_dict()}, tmp_path / "best.pth")
    body = (tmp_path / "best.pth").read_bytes()
    path = "/runs/mine/best.pth"
    server[1].files[path] = body
    predictor = build_predictor(str(config), [], server[0] + path, "cpu", "fp32")
    assert server[1].requests[path] == 1
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    got, ref = predictor(image), Predictor(str(config), weights=str(tmp_path / "best.pth"))(image)
    assert len(ref) > 0 and np.array_equal(got.boxes, ref.boxes) and np.array_equal(got.scores, ref.scores)
