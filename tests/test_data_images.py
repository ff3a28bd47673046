"""read_image: channel order, gray, RGBA, 16-bit, EXIF orientation, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from detkit.data.images import ImageReadError, image_size, read_image


def _quadrants(h: int = 48, w: int = 80) -> np.ndarray:
    """RGB image with four distinct flat quadrants (orientation is easy to check, JPEG-safe)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    buf.tofile(str(path))


def test_png_is_returned_rgb(tmp_path: Path) -> None:
    rgb = _quadrants()
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (48, 80, 3)
    np.testing.assert_array_equal(out, rgb)


def test_odd_path_names(tmp_path: Path) -> None:
    d = tmp_path / "dir with spaces é"
    d.mkdir()
    rgb = _quadrants()
    p = d / "ïmage #1.png"
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    buf.tofile(str(p))
    np.testing.assert_array_equal(read_image(str(p)), rgb)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.arange(40 * 30, dtype=np.uint32).reshape(40, 30).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    out = read_image(tmp_path / "g.png")
    assert out.shape == (40, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :4, 3] = 255  # opaque
    rgba[:, 4:8, 3] = 0  # transparent
    rgba[:, 8:, 3] = 128  # half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (10, 12, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 5], [0, 0, 0])
    np.testing.assert_allclose(out[0, 9].astype(float), np.array([200, 100, 50]) * 128 / 255, atol=1)


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    img16 = np.zeros((6, 7, 3), np.uint16)
    img16[0] = 65535
    img16[1] = 257 * 100
    img16[2, :, 0] = 257 * 10  # BGR on disk: channel 0 is blue
    cv2.imwrite(str(tmp_path / "d.png"), img16)
    assert cv2.imread(str(tmp_path / "d.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really 16-bit
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8
    assert (out[0] == 255).all() and (out[1] == 100).all() and (out[3] == 0).all()
    np.testing.assert_array_equal(out[2, 0], [0, 0, 10])  # blue lands in the RGB blue channel


def test_16bit_grayscale(tmp_path: Path) -> None:
    g = np.full((5, 5), 257 * 42, np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g)
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (5, 5, 3) and (out == 42).all()


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    p = tmp_path / f"o{orientation}.jpg"
    im = Image.fromarray(_quadrants())
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(p, quality=95, exif=exif.tobytes())
    with Image.open(p) as ref_im:
        assert ref_im.getexif().get(0x0112) == orientation
        ref = np.asarray(ImageOps.exif_transpose(ref_im).convert("RGB"))
    out = read_image(p)
    assert out.shape == ref.shape
    if orientation in (5, 6, 7, 8):
        assert out.shape[:2] == (80, 48)  # width and height swapped
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3.0  # same pixels up to JPEG decoder noise
    assert image_size(p) == out.shape[:2]


def test_exif_rotation_6_puts_top_left_at_top_right(tmp_path: Path) -> None:
    p = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    Image.fromarray(_quadrants()).save(p, quality=95, exif=exif.tobytes())
    out = read_image(p).astype(int)
    # stored top-left quadrant (red) ends up top-right after a clockwise rotation
    assert np.abs(out[5, -5] - [255, 0, 0]).max() < 40
    assert np.abs(out[5, 5] - [0, 0, 255]).max() < 40  # stored bottom-left (blue) -> top-left


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    msg = str(e.value)
    assert str(p) in msg and "not found" in msg and "\n" not in msg
    assert e.value.path == str(p)


def test_empty_and_directory(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_corrupt_bytes(tmp_path: Path) -> None:
    p = tmp_path / "bad.jpg"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    assert str(p) in str(e.value)


def test_truncated_jpeg_is_detected(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    rng = np.random.default_rng(0)
    _write_jpeg(good, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    # some OpenCV builds decode truncated JPEGs partially (grey rows); the end-marker check names it
    with pytest.raises(ImageReadError, match="truncated JPEG") as e:
        read_image(cut)
    assert str(cut) in str(e.value)
    # a complete JPEG followed by padding is fine
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(data + b"\x00" * 100)
    assert read_image(padded).shape == (64, 64, 3)


def test_truncated_png_is_detected(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="truncated PNG|not a decodable"):
        read_image(tmp_path / "cut.png")


def test_error_is_picklable() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(ImageReadError("x.jpg", "corrupt")))
    assert isinstance(e, ImageReadError) and str(e) == "cannot read image x.jpg: corrupt"
