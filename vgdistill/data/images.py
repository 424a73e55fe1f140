"""The one place that decodes user images: files and bytes become 8-bit RGB PIL images.

`prepare`, the training loaders and `predict` all go through `load_image`: any mode (grayscale,
palette, CMYK, RGBA, 16-bit) turned into RGB, truncated or unreadable files and decompression
bombs reported as a one-line `VGError` naming the file.

Frames. A JPEG's EXIF orientation tag says how to turn the stored pixels upright. A user's own
photo (`predict`, the API) is decoded upright, as a viewer shows it. A dataset image keeps the
frame its annotation was made in: `prepare` picks it per image (data/exif.py `choose_frame`:
the frame whose size matches the size the annotation gives; the stored pixels, as COCO and the
TransVG loader read them, when no size is given or both match) and stores bytes that decode to
that frame with no orientation left to apply, so every reader sees the pixels the boxes were
drawn on.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vgdistill.data.exif import choose_frame, jpeg_without_orientation, mismatch, orientation
from vgdistill.errors import VGError

# PIL's own default limit (about 89.5 M pixels, a 1024 MB RGBA image): larger images are refused.
DEFAULT_MAX_PIXELS = 89_478_485
MAX_PIXELS_ENV = "VGDISTILL_MAX_PIXELS"
_STORE_AS_IS = {"JPEG", "PNG"}
_pil_limit_lock = threading.Lock()

ImageSource = str | os.PathLike | bytes


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: the argument, else $VGDISTILL_MAX_PIXELS, else PIL's default."""
    if max_pixels is not None:
        return int(max_pixels)
    env = os.environ.get(MAX_PIXELS_ENV)
    if env:
        try:
            return int(env)
        except ValueError:
            raise VGError(f"${MAX_PIXELS_ENV} must be an integer, got {env!r}") from None
    return DEFAULT_MAX_PIXELS


def _label(src: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, bytes):
        return "<image bytes>"
    return str(src)


def _open(src: ImageSource, label: str, limit: int) -> Image.Image:
    """Open (header only) and enforce the pixel limit before any pixel is decoded."""
    fp: io.BytesIO | str | os.PathLike = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        # PIL warns above its own limit and refuses above twice it; we apply `limit` ourselves,
        # so silence the warning and lift PIL's refusal only when our limit is higher.
        with _pil_limit_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            if saved is not None and limit > saved:
                Image.MAX_IMAGE_PIXELS = limit
            try:
                im = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except FileNotFoundError:
        raise VGError(f"image not found: {label}") from None
    except IsADirectoryError:
        raise VGError(f"expected an image file, got a folder: {label}") from None
    except Image.DecompressionBombError as e:
        raise VGError(f"{label}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        if _is_empty(src):
            raise VGError(f"{label}: the file is empty (0 bytes); copy it again") from None
        raise VGError(f"{label}: not an image PIL can read (unknown or corrupt format)") from None
    except OSError as e:
        raise VGError(f"{label}: unreadable or truncated image ({e})") from None
    w, h = im.size
    if w * h > limit:
        raise VGError(
            f"{label}: {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
            f"(possible decompression bomb); raise the limit with ${MAX_PIXELS_ENV} "
            "if the image is trusted"
        )
    if w <= 0 or h <= 0:
        raise VGError(f"{label}: image has no pixels ({w}x{h})")
    return im


def _is_empty(src: ImageSource) -> bool:
    """True for b"" or a 0-byte file (said plainly: a failed copy, not a strange format)."""
    if isinstance(src, bytes):
        return not src
    try:
        return os.path.getsize(src) == 0
    except OSError:
        return False


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, high bit depths scaled."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: PIL's convert('RGB') clips at 255 instead of
        # scaling, which would turn most 16-bit images white.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(np.clip(arr, 0, 255)).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(
    src: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    upright: bool = True,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode a file path or encoded bytes into RGB (EXIF-upright unless upright=False).

    `draft` (width, height) in the stored pixels' frame: a JPEG may be decoded at a reduced
    DCT scale (1/2, 1/4, 1/8) whose size is still at least that, for a caller that shrinks
    the image anyway (a fraction of the work of a full decode).
    """
    label = _label(src, name)
    limit = max_pixels_limit(max_pixels)
    opened = _open(src, label, limit)
    rgb = None
    try:
        if draft is not None and opened.format == "JPEG":
            opened.draft(opened.mode, draft)
        opened.load()
        turn = upright and orientation(opened) != 1
        im = ImageOps.exif_transpose(opened) if turn else opened
        rgb = _to_rgb(im)
    except VGError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncation as OSError("image file is truncated ...").
        raise VGError(f"{label}: unreadable or truncated image ({e})") from None
    finally:
        if rgb is not opened:  # the result may be the opened image itself (already RGB)
            opened.close()
    assert rgb is not None
    return rgb


@dataclass(frozen=True)
class StoredImage:
    """Encoded bytes to embed in a prepared dataset, and the size they decode to.

    The bytes decode to `frame` ("stored" pixels or EXIF-"upright") with no orientation left
    to apply; `orientation` is the EXIF tag the source image carried (1 = none).
    """

    data: bytes
    width: int
    height: int
    reencoded: bool
    orientation: int = 1
    frame: str = "stored"


class SizeMismatch(VGError):
    """The size the annotation gives matches neither frame of the image."""

    def __init__(self, message: str, orientation: int) -> None:
        super().__init__(message)
        self.orientation = orientation


def image_for_storage(
    src: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    size: tuple[int, int] | None = None,
    frame: str = "auto",
) -> StoredImage:
    """Validate an image fully and return bytes in the annotation's frame (see `choose_frame`).

    JPEG/PNG files already in that frame keep their original bytes (no quality loss, no
    re-encoding cost); a JPEG kept in its stored frame gets its orientation tag set to 1 in
    place; anything else (turned upright, CMYK, 16-bit, TIFF, WebP, alpha...) is decoded with
    `load_image` and re-encoded losslessly as an RGB PNG. SizeMismatch when `size` fits no frame.
    """
    label = _label(src, name)
    limit = max_pixels_limit(max_pixels)
    data = src if isinstance(src, bytes) else _read_bytes(src, label)
    im = _open(data, label, limit)
    try:
        fmt, mode, stored = im.format, im.mode, im.size
        tag = orientation(im)
        alpha = "transparency" in im.info
        if fmt == "JPEG":
            # Decoding at 1/8 scale still walks the whole entropy-coded stream, so truncation
            # is detected at a fraction of the cost of a full decode.
            im.draft(im.mode, (max(1, stored[0] // 8), max(1, stored[1] // 8)))
        im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise VGError(f"{label}: unreadable or truncated image ({e})") from None
    finally:
        im.close()
    chosen = choose_frame(stored, tag, size, frame)
    if chosen is None:
        raise SizeMismatch(mismatch(label, stored, tag, size, frame), tag)
    keep = fmt in _STORE_AS_IS and mode in ("RGB", "L") and not alpha
    if keep and tag == 1:
        return StoredImage(data, stored[0], stored[1], reencoded=False)
    if keep and chosen == "stored" and fmt == "JPEG":
        untagged = jpeg_without_orientation(data)
        if untagged is not None:
            return StoredImage(untagged, *stored, reencoded=False, orientation=tag)
    turn = chosen == "upright"
    rgb = load_image(data, name=label, max_pixels=limit, upright=turn)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=3)  # PNG written without EXIF: nothing to turn
    return StoredImage(
        buf.getvalue(), rgb.width, rgb.height, True, orientation=tag, frame=chosen
    )


def _read_bytes(path: str | os.PathLike, label: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise VGError(f"image not found: {label}") from None
    except IsADirectoryError:
        raise VGError(f"expected an image file, got a folder: {label}") from None
    except OSError as e:
        raise VGError(f"{label}: cannot read image ({e.strerror or e})") from None


@dataclass(frozen=True)
class ImageIndex:
    """A split's rows grouped by image: the one "distinct images" index every stage uses."""

    first_row: list[int]
    """image k -> the first row that holds it (rows in split order)."""
    image_of_row: list[int]
    """row -> its image's index k."""

    @classmethod
    def from_ids(cls, image_ids: Sequence[Any]) -> ImageIndex:
        """Group rows by their image_id, images numbered in order of first appearance."""
        index: dict[Any, int] = {}
        first_row: list[int] = []
        image_of_row: list[int] = []
        for row, image_id in enumerate(image_ids):
            k = index.setdefault(image_id, len(first_row))
            if k == len(first_row):
                first_row.append(row)
            image_of_row.append(k)
        return cls(first_row, image_of_row)

    def __len__(self) -> int:
        return len(self.first_row)

    def rows_of(self) -> list[list[int]]:
        """image k -> every row that holds it, in split order."""
        rows: list[list[int]] = [[] for _ in self.first_row]
        for row, k in enumerate(self.image_of_row):
            rows[k].append(row)
        return rows
