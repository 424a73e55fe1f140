"""EXIF orientation: reading the tag, choosing a dataset image's frame, clearing the tag.

A JPEG's orientation tag (EXIF 0x0112, or XMP tiff:Orientation as PIL reads it) says how to
turn the stored pixels upright. data/images.py uses these to keep each dataset image in the
frame its annotations were made in.
"""

from __future__ import annotations

import io
import struct

from PIL import Image

from vgdistill.data.sources.base import EXIF_FRAMES
from vgdistill.errors import VGError

# EXIF tag 0x0112: how the camera was held; 1 = already upright, 2-8 = flip and/or rotation.
_ORIENTATION = 0x0112
# Orientations whose upright image is the stored one turned a quarter: width and height swap.
_SWAPS = {5, 6, 7, 8}


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (EXIF or XMP, as PIL reads it); 1 when absent or not in 1-8."""
    try:
        value = int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def choose_frame(
    stored: tuple[int, int], tag: int, annotated: tuple[int, int] | None, rule: str
) -> str | None:
    """The frame ("stored" or "upright") a dataset image is kept in; None when none fits.

    `tag` is the image's EXIF orientation; `annotated` the (width, height) the source gives
    for the image, if any. Rule "auto":
    the frame whose size matches it; the stored pixels when no size is given or both match
    (COCO's sizes and the TransVG loader use the stored pixels). Rule "stored" / "upright":
    that frame, provided its size matches a given size.
    """
    if rule not in EXIF_FRAMES:
        raise VGError(f"the EXIF frame must be one of {', '.join(EXIF_FRAMES)}, got {rule!r}")
    width, height = stored
    upright = (height, width) if tag in _SWAPS else (width, height)
    sizes = {"stored": (width, height), "upright": upright}
    given = None if annotated is None else tuple(annotated)
    if rule != "auto":
        return rule if given is None or sizes[rule] == given else None
    for frame in ("stored", "upright"):
        if given is None or sizes[frame] == given:
            return frame
    return None


def mismatch(
    label: str, stored: tuple[int, int], tag: int, annotated: tuple[int, int], rule: str
) -> str:
    """The one-line reason an image's size matches no allowed frame."""
    what = f"{label}: the annotations give the image as {annotated[0]}x{annotated[1]}"
    pixels = f"its pixels are {stored[0]}x{stored[1]}"
    if tag in _SWAPS:
        pixels += f" ({stored[1]}x{stored[0]} upright, EXIF orientation {tag})"
    forced = f" and the frame is set to {rule}" if rule != "auto" else ""
    return f"{what}, but {pixels}{forced}"


def jpeg_without_orientation(data: bytes) -> bytes | None:
    """The JPEG with its EXIF orientation set to 1 in place (pixels untouched), or None.

    Walks the markers to the first APP1 Exif segment and rewrites the IFD0 orientation entry.
    None when the layout is unusual or an orientation still reads afterwards (e.g. from XMP):
    the caller then re-encodes the pixels instead.
    """
    pos = 2 if data[:2] == b"\xff\xd8" else len(data)
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no header segments follow
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            patched = _tiff_orientation_to_1(data, pos + 10, pos + 2 + length)
            if patched is None:
                return None
            with Image.open(io.BytesIO(patched)) as check:
                return patched if orientation(check) == 1 else None
        pos += 2 + length
    return None


def _tiff_orientation_to_1(data: bytes, tiff: int, end: int) -> bytes | None:
    """`data` with the TIFF block at [tiff, end)'s IFD0 orientation (SHORT) set to 1."""
    order = {b"II": "<", b"MM": ">"}.get(data[tiff : tiff + 2])
    if order is None or tiff + 8 > end:
        return None
    ifd = tiff + struct.unpack(order + "I", data[tiff + 4 : tiff + 8])[0]
    if ifd + 2 > end:
        return None
    count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > end:
            return None
        tag, kind, n = struct.unpack(order + "HHI", data[entry : entry + 8])
        if tag == _ORIENTATION and kind == 3 and n == 1:  # one SHORT, stored in the entry
            value = struct.pack(order + "H", 1)
            return data[: entry + 8] + value + data[entry + 10 :]
    return None
