"""Image decoding edge cases: every odd file becomes RGB in its frame or a one-line VGError."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vgdistill.data.exif import choose_frame
from vgdistill.data.images import SizeMismatch, image_for_storage, load_image
from vgdistill.errors import VGError


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w=40, h=24) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, 255 - x, np.full_like(x, 90)], -1), "RGB")


def _banded(w=40, h=20) -> Image.Image:
    """Black with a white band on the left edge: which way it was turned is easy to see."""
    im = Image.new("RGB", (w, h), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, h))
    return im


def _tagged(orientation: int, im: Image.Image | None = None, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im or _banded(), "JPEG", exif=exif, quality=95, **kw)


def test_exif_rotated_jpeg_is_made_upright_for_users_not_for_datasets(tmp_path):
    path = tmp_path / "rot.jpg"
    path.write_bytes(_tagged(6))  # stored 40x20: a viewer turns it 90 degrees clockwise
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 40)
    # Rotated clockwise, the left band becomes the top band.
    assert np.asarray(out)[:8].mean() > 200 and np.asarray(out)[-8:].mean() < 60
    stored_px = load_image(path, upright=False)
    assert stored_px.size == (40, 20) and np.asarray(stored_px)[:, :8].mean() > 200

    # No size from the source: the stored pixels, as the TransVG loader reads them; the JPEG
    # keeps its bytes but its tag says 1, so an EXIF-aware decoder sees the same pixels.
    kept = image_for_storage(str(path))
    assert (kept.frame, kept.orientation, kept.reencoded) == ("stored", 6, False)
    assert len(kept.data) == path.stat().st_size and kept.data != path.read_bytes()
    assert np.array_equal(np.asarray(load_image(kept.data)), np.asarray(stored_px))
    assert Image.open(io.BytesIO(kept.data)).getexif().get(0x0112) == 1

    # The source says the image is 20x40: the upright frame, re-encoded so any decoder agrees.
    turned = image_for_storage(str(path), size=(20, 40))
    assert (turned.frame, turned.reencoded) == ("upright", True)
    assert (turned.width, turned.height) == Image.open(io.BytesIO(turned.data)).size == (20, 40)
    assert np.array_equal(np.asarray(load_image(turned.data, upright=False)), np.asarray(out))


@pytest.mark.parametrize(
    ("orientation", "annotated", "rule", "frame"),
    [
        (6, (64, 48), "auto", "stored"),  # COCO's case: the size is the stored pixels'
        (6, (48, 64), "auto", "upright"),
        (8, (48, 64), "auto", "upright"),
        (6, None, "auto", "stored"),  # no size given (TransVG split files): stored pixels
        (3, (64, 48), "auto", "stored"),  # both frames fit: stored pixels
        (6, (50, 50), "auto", None),  # neither fits
        (1, (48, 64), "auto", None),
        (3, (64, 48), "upright", "upright"),  # the user says which frame
        (6, None, "upright", "upright"),
        (6, (48, 64), "stored", None),
        (1, (64, 48), "upright", "upright"),
    ],
)
def test_choose_frame(orientation, annotated, rule, frame):
    assert choose_frame((64, 48), orientation, annotated, rule) == frame


def test_size_mismatch_and_bad_rule():
    with pytest.raises(SizeMismatch, match=r"as 50x50, but its pixels are 40x20 \(20x40 upright"):
        image_for_storage(_tagged(6), name="x.jpg", size=(50, 50))
    with pytest.raises(VGError, match="must be one of auto, stored, upright"):
        choose_frame((4, 4), 1, None, "sideways")


def _big_endian_exif(orientation: int) -> bytes:
    """An EXIF block written Motorola-order (MM), as some cameras do: IFD0 with one entry."""
    entry = struct.pack(">HHIH2x", 0x0112, 3, 1, orientation)
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IH", 8, 1) + entry + struct.pack(">I", 0)


@pytest.mark.parametrize("byte_order", ["II", "MM"])
def test_stored_frame_jpeg_keeps_its_pixels_with_the_tag_cleared(byte_order):
    im = _gradient(48, 32)
    data = _tagged(8, im) if byte_order == "II" else _encode(im, "JPEG", exif=_big_endian_exif(8))
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 8
    kept = image_for_storage(data, size=(48, 32))
    assert (kept.frame, kept.orientation, kept.reencoded) == ("stored", 8, False)
    assert np.array_equal(
        np.asarray(load_image(kept.data)), np.asarray(load_image(data, upright=False))
    )


def test_orientation_only_in_xmp_is_reencoded_in_the_stored_frame():
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    data = _encode(_banded(), "JPEG", quality=95, xmp=xmp)
    kept = image_for_storage(data)
    assert (kept.frame, kept.orientation, kept.reencoded) == ("stored", 6, True)
    assert load_image(kept.data).size == (40, 20)  # nothing left to turn


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
