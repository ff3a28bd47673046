"""Weights by name: ``torchvision://``, ``detectron2://`` and ``http(s)://`` sources, downloaded once into a
verified cache.

Wherever a weights path is accepted (``model.weights``, ``model.backbone.weights``, ``--weights``,
``Predictor(weights=...)``), these names are accepted too:

==============================================================  ============================================
name                                                            file
==============================================================  ============================================
``torchvision://MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1``      the URL of that member of the installed
                                                                torchvision's weight enum
``torchvision://`` (alone)                                      the COCO weights of the ``configs/torchvision``
                                                                config in use (``model.weights``), or the
                                                                backbone architecture's ``DEFAULT`` ImageNet
                                                                weights (``model.backbone.weights``)
``detectron2://ImageNetPretrained/MSRA/R-50.pkl``               Detectron2's model-zoo prefix + the path
``https://...``, ``http://...``                                 the URL
==============================================================  ============================================

Files are cached under ``$DETKIT_HOME/weights`` (default ``~/.cache/detkit/weights``), at
``<host>/<url path>``, so two zoo files of the same name never collide.

* **Verified:** a file name that carries a SHA-256 prefix (``resnet50-0676ba61.pth``, torchvision's
  convention) is checked after the download and each time the cached file is used; a mismatch is
  refused in one line and the file removed. A response shorter than its ``Content-Length`` is refused too.
* **Atomic:** the download goes to a ``.part`` file in the cache folder and is renamed into place only
  when complete and verified, so an interrupted download never leaves a file that looks complete.
* **One download per machine:** a file lock next to the cached file; other processes (the other DDP
  ranks of the node, a second tool) wait for it, then use the cached file.
* **Offline:** with ``DETKIT_OFFLINE=1`` nothing is fetched: the cached file is used, or the one-line
  error names the URL and the path to place the file at by hand. The same error comes when the network
  cannot be reached.

Why not ``torch.hub.download_url_to_file``: it has no timeout (a stalled server hangs the job) and keeps a
body shorter than its ``Content-Length`` as if it were complete. The download here is a plain ``urllib``
stream with ``tqdm``'s progress bar and both checks.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..fileio import detkit_home
from .conventions import FAIR_X101, MSRA, TORCHVISION, InputConvention
from .files import CheckpointError

__all__ = [
    "DETECTRON2_ZOO_PREFIX",
    "WeightsName",
    "cache_dir",
    "fetch_weights",
    "is_weights_name",
    "parse_weights_name",
    "sha256_prefix_of",
]

#: what ``detectron2://`` stands for (Detectron2's ``ModelCatalog.S3_PREFIX``)
DETECTRON2_ZOO_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"
_SCHEMES = ("torchvision://", "detectron2://", "https://", "http://")
_TORCHVISION_HOST = "download.pytorch.org"
# torchvision's file names end in "-<first hex digits of the SHA-256>.<ext>"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WeightsName:
    """A weights source given by name.

    Attributes:
        name: what the user wrote, e.g. ``"torchvision://ResNet50_Weights.IMAGENET1K_V2"``.
        url: where the file is, e.g. ``"https://download.pytorch.org/models/resnet50-11ad3fa6.pth"``.
        sha256_prefix: the hex prefix the file's SHA-256 must start with, None when the name carries none.
        convention: the input normalization the source is known to expect (torchvision's, MSRA's), None
            when only the file can tell.
        stride_in_1x1: for Detectron2's ImageNet ResNets, where their downsampling blocks stride (True: the
            1x1 conv, MSRA's Caffe2 models; False: the 3x3 conv, FAIR's X-101); None: not known by name.
    """

    name: str
    url: str
    sha256_prefix: Optional[str]
    convention: Optional[InputConvention]
    stride_in_1x1: Optional[bool] = None


def is_weights_name(source: object) -> bool:
    """True when ``source`` is a string naming weights by scheme (``torchvision://``, ``detectron2://``,
    ``http(s)://``) rather than a local path."""
    return isinstance(source, str) and source.startswith(_SCHEMES)


def cache_dir() -> Path:
    """``$DETKIT_HOME/weights``; ``DETKIT_HOME`` defaults to ``~/.cache/detkit`` (:func:`detkit.fileio.detkit_home`)."""
    return detkit_home() / "weights"


def _offline() -> bool:
    return os.environ.get("DETKIT_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def sha256_prefix_of(url: str, trusted_host: bool = False) -> Optional[str]:
    """The SHA-256 prefix in the URL's file name (``...-0676ba61.pth``), or None.

    An all-digit suffix (``model-20240101.pth``) is a date or a version as often as a hash, so it counts
    only for torchvision's own files (``trusted_host``, or a URL on download.pytorch.org).
    """
    filename = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    m = _HASH_IN_NAME.search(filename)
    if not m:
        return None
    digits_only = m.group(1).isdigit()
    if digits_only and not (trusted_host or urllib.parse.urlsplit(url).hostname == _TORCHVISION_HOST):
        return None
    return m.group(1)


def _torchvision_url(member: str, name: str) -> str:
    from torchvision.models import get_weight

    try:
        return get_weight(member).url
    except (ValueError, KeyError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{name}: not a weights enum member of the installed torchvision ({detail}); name one as "
            "torchvision://<Enum>.<member>, e.g. torchvision://ResNet50_Weights.IMAGENET1K_V2 or "
            "torchvision://MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
        ) from None


def _detectron2_name(name: str, url: str, path: str) -> WeightsName:
    # Detectron2's ImageNet initializations: the MSRA Caffe2 ResNets (BGR, 0-255, mean only, stride in the
    # 1x1 conv) and FAIR's X-101-32x8d (BGR, with a std, stride in the 3x3 conv); the zoo's detectors state
    # their own pixel_mean/pixel_std in the file
    if path.startswith("ImageNetPretrained/MSRA/"):
        return WeightsName(name, url, None, MSRA, stride_in_1x1=True)
    if path.startswith("ImageNetPretrained/FAIR/X-101-32x8d"):
        return WeightsName(name, url, None, FAIR_X101, stride_in_1x1=False)
    return WeightsName(name, url, sha256_prefix_of(url), None)


def parse_weights_name(name: str, default_member: Optional[str] = None) -> WeightsName:
    """Resolve a weights name to its URL, hash prefix and known input convention (no network).

    Args:
        name: ``torchvision://<Enum>.<member>``, ``torchvision://``, ``detectron2://<path>`` or an
            ``http(s)://`` URL.
        default_member: what a bare ``torchvision://`` stands for (see
            :func:`detkit.checkpoint.initial.load_initial_weights`); None: a bare name is refused.

    Raises:
        CheckpointError: one line, for an unknown scheme, an unknown torchvision member or a bare
            ``torchvision://`` without a default.
    """
    if name.startswith("torchvision://"):
        member = name[len("torchvision://"):].strip("/")
        if not member:
            if default_member is None:
                raise CheckpointError(
                    f"{name!r} alone names the weights of a configs/torchvision/ config; this config is not one of "
                    "them: name the weights, e.g. torchvision://MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
                )
            member = default_member
        url = _torchvision_url(member, name)
        return WeightsName(name, url, sha256_prefix_of(url, trusted_host=True), TORCHVISION)
    if name.startswith("detectron2://"):
        path = name[len("detectron2://"):].lstrip("/")
        if not path:
            raise CheckpointError(f"{name!r} names no file; e.g. detectron2://ImageNetPretrained/MSRA/R-50.pkl")
        return _detectron2_name(name, DETECTRON2_ZOO_PREFIX + path, path)
    if name.startswith(("https://", "http://")):
        if name.startswith(DETECTRON2_ZOO_PREFIX):
            return _detectron2_name(name, name, name[len(DETECTRON2_ZOO_PREFIX):])
        torchvision = urllib.parse.urlsplit(name).hostname == _TORCHVISION_HOST
        return WeightsName(name, name, sha256_prefix_of(name), TORCHVISION if torchvision else None)
    raise CheckpointError(f"{name!r} is not a weights name: use a file path, torchvision://<Enum>.<member>, "
                          "detectron2://<path> or an http(s):// URL")


def cached_path(url: str, root: Optional[Path] = None) -> Path:
    """Where ``url`` is cached: ``<root>/<host>/<url path>`` (``root``: :func:`cache_dir`)."""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if not segments or any(s in (".", "..") for s in segments) or not parts.hostname:
        raise CheckpointError(f"{url}: not a URL of a file (it needs a host and a file name)")
    host = parts.hostname + (f"_{parts.port}" if parts.port else "")
    return (root or cache_dir()).joinpath(host, *segments)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, wn: WeightsName, shown: Path) -> None:
    """Refuse (and remove) ``path`` when its SHA-256 does not start with the name's prefix."""
    if wn.sha256_prefix is None:
        return
    digest = _sha256(path)
    if not digest.startswith(wn.sha256_prefix):
        path.unlink(missing_ok=True)
        raise CheckpointError(
            f"{wn.url}: the file's SHA-256 is {digest[:16]}..., but its name says {wn.sha256_prefix}: the download "
            f"is corrupt or was replaced; {shown} was removed, run again to download it again"
        )


def _download(wn: WeightsName, dest: Path) -> None:
    """Stream ``wn.url`` into a ``.part`` file next to ``dest``, check length and hash, rename into place."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    request = urllib.request.Request(wn.url, headers={"User-Agent": "detkit"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(part, "wb") as f:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            got = 0
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and got != expected:
                raise CheckpointError(f"{wn.url}: the download stopped after {got} of {expected} bytes (connection "
                                      "closed early); nothing was kept, run again to retry")
            f.flush()
            os.fsync(f.fileno())
        _verify(part, wn, part)
        os.replace(part, dest)
    except CheckpointError:
        raise
    except urllib.error.HTTPError as e:
        raise CheckpointError(
            f"{wn.name}: the server answered HTTP {e.code} {e.reason} for {wn.url}: check the name; or place the "
            f"file at {dest} by hand"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(
            f"{wn.name}: cannot download {wn.url} ({str(reason).strip()[:160] or type(e).__name__}); on a machine "
            f"without network place the file at {dest} by hand (or set DETKIT_OFFLINE=1 to use only the cache)"
        ) from None
    finally:
        part.unlink(missing_ok=True)


def fetch_weights(wn: WeightsName, root: Optional[Path] = None) -> Path:
    """The cached file of ``wn``, downloaded first if needed (see the module doc); returns its path.

    Raises:
        CheckpointError: one line naming the URL and the cache path: offline without a cached copy, no
            network, an HTTP error, a truncated download or a hash mismatch.
    """
    from filelock import FileLock

    dest = cached_path(wn.url, root)
    if dest.is_file():
        _verify(dest, wn, dest)
        return dest
    if _offline():
        raise CheckpointError(f"{wn.name}: DETKIT_OFFLINE is set and {wn.url} is not cached; place the file at "
                              f"{dest}, or unset DETKIT_OFFLINE to download it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # one download per machine: the other processes wait here, then find the file
    with FileLock(str(dest) + ".lock"):
        if not dest.is_file():
            _download(wn, dest)  # verified before it was renamed into place
            return dest
    _verify(dest, wn, dest)  # another process downloaded it
    return dest
