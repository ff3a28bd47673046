"""Robust image decoding: every image detkit reads goes through :func:`read_image`.

The result is always an ``H x W x 3`` ``uint8`` RGB array, whatever is on disk:
grayscale, gray+alpha, RGBA (composited on black), 16-bit (scaled to 8-bit) or
float images, with the EXIF orientation applied. Missing, empty, truncated or
corrupt files raise :class:`ImageReadError` with a one-line message naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from ..errors import DetkitError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "apply_exif_orientation",
    "exif_orientation",
    "image_size",
    "read_image",
]

PathLike = Union[str, os.PathLike]

#: File extensions treated as images by folder-based datasets (lower case, with the dot).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND"


class ImageReadError(DetkitError, OSError):
    """An image file could not be read or decoded.

    Attributes:
        path: the file.
        reason: short human-readable cause ("file not found", "truncated JPEG", ...).
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __str__(self) -> str:  # OSError's default __str__ prefixes errno fields
        return f"cannot read image {self.path}: {self.reason}"

    def __reduce__(self):  # keep it picklable across DataLoader workers
        return (ImageReadError, (self.path, self.reason))


def _check_complete(data: np.ndarray) -> str | None:
    """Cheap structural check for truncation of JPEG / PNG byte streams; returns a reason or None.

    OpenCV decodes truncated JPEGs partially (grey bottom rows) without failing, so the
    end-of-image marker is checked explicitly. Trailing padding after the marker is tolerated.
    """
    head = data[:8].tobytes()
    tail = data[-1024:].tobytes()
    if head.startswith(_JPEG_SOI):
        if _JPEG_EOI not in tail.rstrip(b"\x00\r\n\t "):
            return "truncated JPEG (no end-of-image marker FF D9); re-export or remove the file"
    elif head == _PNG_SIG:
        if _PNG_IEND not in tail[-64:]:
            return "truncated PNG (no IEND chunk); re-export or remove the file"
    return None


def exif_orientation(data: bytes | np.ndarray) -> int:
    """The EXIF orientation tag (1..8) of an encoded image, 1 when absent or unreadable."""
    try:
        from PIL import Image  # Pillow ships with torchvision; parsing the header is cheap

        raw = data.tobytes() if isinstance(data, np.ndarray) else data
        with Image.open(io.BytesIO(raw)) as im:
            value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - no or broken EXIF: keep the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def apply_exif_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Return ``img`` (H x W [x C]) as it should be displayed for an EXIF ``orientation``."""
    if orientation == 2:  # mirrored horizontally
        img = img[:, ::-1]
    elif orientation == 3:  # rotated 180
        img = img[::-1, ::-1]
    elif orientation == 4:  # mirrored vertically
        img = img[::-1]
    elif orientation == 5:  # transpose
        img = np.swapaxes(img, 0, 1)
    elif orientation == 6:  # stored rotated 90 CCW: rotate 90 CW to display
        img = np.rot90(img, k=-1)
    elif orientation == 7:  # transverse
        img = np.swapaxes(img, 0, 1)[::-1, ::-1]
    elif orientation == 8:  # stored rotated 90 CW: rotate 90 CCW to display
        img = np.rot90(img, k=1)
    return np.ascontiguousarray(img)


def _to_uint8(img: np.ndarray, path: PathLike) -> np.ndarray:
    """Scale any supported depth to uint8."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        # 65535 -> 255 exactly; round to nearest
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if img.dtype in (np.float32, np.float64, np.float16):
        return (np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8)
    raise ImageReadError(path, f"unsupported pixel type {img.dtype}; convert the image to 8-bit RGB")


def _to_rgb(img: np.ndarray, path: PathLike) -> np.ndarray:
    """OpenCV channel layouts (gray, gray+alpha, BGR, BGRA) -> RGB; alpha composited on black."""
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        gray, alpha = img[:, :, 0], img[:, :, 1]
        if not (alpha == 255).all():
            gray = ((gray.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
        return cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        alpha = img[:, :, 3]
        if not (alpha == 255).all():
            rgb = ((rgb.astype(np.uint16) * alpha[:, :, None] + 127) // 255).astype(np.uint8)
        return rgb
    raise ImageReadError(path, f"unsupported number of channels ({channels}); convert the image to RGB")


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as ``uint8`` RGB ``[H, W, 3]`` with its EXIF orientation applied.

    Args:
        path: any path (non-ASCII names work: bytes are read with numpy and decoded in memory).

    Raises:
        ImageReadError: missing, empty, truncated, corrupt or unsupported file.
    """
    try:
        data = np.fromfile(os.fspath(path), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot open file ({e.strerror or e})") from None
    return decode_image_bytes(data, path)


def decode_image_bytes(data: np.ndarray, path: PathLike) -> np.ndarray:
    """Decode an image file's bytes as :func:`read_image` does: ``uint8`` RGB ``[H, W, 3]``, EXIF
    orientation applied, gray / alpha / 16-bit converted.

    Args:
        data: uint8 [N], the whole file.
        path: what the bytes are, for messages (a file name, or e.g. ``"<upload>"``).

    Raises:
        ImageReadError: empty, truncated, corrupt or unsupported data.
    """
    if data.size == 0:
        raise ImageReadError(path, "empty file")
    reason = _check_complete(data)
    if reason is not None:
        raise ImageReadError(path, reason)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageReadError(path, "not a decodable image (corrupt or unsupported format)")
    img = _to_rgb(_to_uint8(img, path), path)
    orientation = exif_orientation(data)
    if orientation != 1:
        img = apply_exif_orientation(img, orientation)
    return np.ascontiguousarray(img)


def image_size(path: PathLike) -> tuple[int, int]:
    """(height, width) of an image as :func:`read_image` would return it, reading only the header."""
    from PIL import Image

    p = Path(path)
    try:
        with Image.open(p) as im:
            w, h = im.size
            orientation = int(im.getexif().get(0x0112, 1))
    except FileNotFoundError:
        raise ImageReadError(p, "file not found") from None
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(p, f"cannot read image header ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
