"""Uploaded bytes -> the RGB image the model sees, with size guards checked before decoding.

:func:`decode_image` gives exactly what :func:`detkit.data.images.read_image` gives for the same
file (training's reader): OpenCV's decoder, grayscale / gray+alpha / RGBA (composited on black) /
16-bit converted to ``uint8`` RGB, the EXIF orientation applied, truncated JPEG / PNG files
refused. Before any pixel is decoded the byte count and the header's width x height are checked
against the limits, so a small file that claims a huge image (a decompression bomb) costs
nothing. Failures raise :class:`ImageRejected` with the HTTP status the server answers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np

from ..data.images import ImageReadError, decode_image_bytes
from ..errors import DetkitError

__all__ = ["ImageRejected", "ImageHeader", "decode_image", "read_header"]

UPLOAD = "upload"  # the "file name" in messages of training's reader


class ImageRejected(DetkitError, ValueError):
    """An uploaded image is refused.

    Attributes:
        status: the HTTP status to answer (400: not a readable image, 413: too large).
        message: one line saying what is wrong.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says: ``width``, ``height`` (as stored, before the EXIF
    orientation), ``orientation`` (EXIF tag 1..8, 1 when absent) and PIL's ``format`` name."""

    width: int
    height: int
    orientation: int
    format: str


def read_header(data: bytes, max_pixels: int) -> ImageHeader:
    """Parse only the header of an encoded image (PIL opens files lazily).

    Raises:
        ImageRejected: 400 when no known image format starts ``data``; 413 when width x height
            is over ``max_pixels`` (or over PIL's own decompression-bomb limit).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format or "?"
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored, as read_image does
                orientation = 1
    except Image.DecompressionBombError as e:
        raise ImageRejected(413, f"image too large: {' '.join(str(e).split())}") from None
    except UnidentifiedImageError:
        raise ImageRejected(400, "not an image: the data is no known image format (send a JPEG, PNG, BMP, "
                                 "TIFF or WebP file)") from None
    except Exception as e:  # noqa: BLE001 - a header PIL chokes on is not a readable image
        raise ImageRejected(400, f"not a readable image: {' '.join(str(e).split()) or type(e).__name__}") from None
    if width * height > max_pixels:
        raise ImageRejected(413, f"image too large: {width}x{height} = {width * height} pixels, over the limit "
                                 f"of {max_pixels} (--max-pixels); send a smaller image")
    return ImageHeader(int(width), int(height), orientation if 1 <= orientation <= 8 else 1, fmt)


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image file as ``uint8`` RGB ``[H, W, 3]``, EXIF orientation applied.

    The pixels equal :func:`detkit.data.images.read_image` on the same file.

    Args:
        data: the file's bytes.
        max_bytes: largest accepted ``len(data)``.
        max_pixels: largest accepted width x height (checked on the header, before decoding).

    Raises:
        ImageRejected: 413 over a limit; 400 empty, not an image, truncated or corrupt.
    """
    if len(data) == 0:
        raise ImageRejected(400, "empty image: the upload holds no bytes")
    if len(data) > max_bytes:
        raise ImageRejected(413, f"image file too large: {len(data)} bytes, over the limit of {max_bytes} "
                                 "(--max-bytes); send a smaller file")
    header = read_header(data, max_pixels)  # the pixel limit, before any pixel is decoded
    try:
        img = decode_image_bytes(np.frombuffer(data, dtype=np.uint8), UPLOAD)  # as training reads files
    except cv2.error as e:  # OpenCV's own pixel limit (detkit.serve.limits), when the header understated it
        if "MAX_IMAGE_PIXELS" not in str(e):
            raise
        raise ImageRejected(413, f"image too large: the {header.format} data holds more pixels than its "
                                 f"{header.width}x{header.height} header says, over the limit (--max-pixels)") from None
    except ImageReadError as e:
        if e.reason.startswith("not a decodable image"):
            raise ImageRejected(400, f"not a decodable image: the {header.format} data is corrupt or unsupported") from None
        raise ImageRejected(400, e.reason.split(";")[0] + "; send the complete file") from None
    if img.shape[0] * img.shape[1] > max_pixels:  # the header lied
        raise ImageRejected(413, f"image too large: {img.shape[1]}x{img.shape[0]} pixels, over the limit of "
                                 f"{max_pixels} (--max-pixels)")
    return img
