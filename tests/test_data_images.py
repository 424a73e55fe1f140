"""Image decoding edge cases: every odd file becomes upright RGB or a one-line VGError."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vgdistill.data.images import image_for_storage, load_image
from vgdistill.errors import VGError


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w=40, h=24) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, 255 - x, np.full_like(x, 90)], -1), "RGB")


def test_exif_rotated_jpeg_is_made_upright(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    path.write_bytes(_encode(im, "JPEG", exif=exif, quality=95))
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 40)
    # Rotated clockwise, the left band becomes the top band.
    assert np.asarray(out)[:8].mean() > 200 and np.asarray(out)[-8:].mean() < 60
    stored = image_for_storage(str(path))
    assert stored.reencoded and (stored.width, stored.height) == (20, 40)
    assert Image.open(io.BytesIO(stored.data)).size == (20, 40)  # any decoder sees it upright


def test_cmyk_jpeg_becomes_rgb():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    out = load_image(data)
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60  # cyan-free magenta+yellow = red
    assert image_for_storage(data).reencoded


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    data = _encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    px = np.asarray(load_image(data))
    assert px.shape == (8, 8, 3) and abs(int(px[0, 0, 0]) - 128) <= 1


def test_palette_and_rgba_and_gray():
    pal = _gradient().convert("P", palette=Image.ADAPTIVE, colors=16)
    assert load_image(_encode(pal, "PNG")).mode == "RGB"
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    out = np.asarray(load_image(_encode(rgba, "PNG")))
    assert (out == 255).all()  # composited on white, not the hidden red
    gray = load_image(_encode(Image.new("L", (8, 8), 77), "PNG"))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [77, 77, 77]
    # Plain RGB JPEG and grayscale PNG are stored as they are (no re-encoding).
    assert not image_for_storage(_encode(_gradient(), "JPEG")).reencoded
    assert not image_for_storage(_encode(Image.new("L", (8, 8)), "PNG")).reencoded


def test_truncated_jpeg_names_the_file(tmp_path):
    data = _encode(_gradient(64, 64), "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VGError, match="cut.jpg: unreadable or truncated"):
        load_image(path)
    with pytest.raises(VGError, match="cut.jpg"):
        image_for_storage(str(path))


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(VGError, match="notes.jpg"):
        load_image(bad)
    with pytest.raises(VGError, match="image not found.*nope.png"):
        load_image(tmp_path / "nope.png")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit gray) with one empty data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused(monkeypatch):
    bomb = _png_header(20_000, 20_000)  # 400 M pixels in a few dozen bytes
    with pytest.raises(VGError, match="decompression bomb"):
        load_image(bomb, name="bomb.png")
    with pytest.raises(VGError, match="decompression bomb"):
        image_for_storage(bomb, name="bomb.png")
    # The limit is configurable (argument or environment), also below PIL's own.
    small = _encode(_gradient(40, 24), "PNG")
    with pytest.raises(VGError, match="exceeds the limit of 500"):
        load_image(small, max_pixels=500)
    monkeypatch.setenv("VGDISTILL_MAX_PIXELS", "100")
    with pytest.raises(VGError, match="exceeds the limit of 100"):
        load_image(small)
