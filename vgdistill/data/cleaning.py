"""How `vgdistill prepare` cleans a row: the phrase, the box, the objects column, the image.

Cleaning, per split, every decision counted (nothing is dropped silently):
  empty phrase      -> dropped          missing image / unreadable image -> dropped (or an error)
  box partly outside the image -> clipped (kept, counted)
  box entirely outside -> dropped       box narrower or shorter than 1 px -> dropped (degenerate)
  same image + phrase + box twice in a split -> the repeat is dropped (duplicate)
  image size given by the source fits neither the stored nor the EXIF-upright pixels -> dropped
  (image size mismatch); EXIF-tagged images are counted with the frame each was kept in
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

from vgdistill.data.images import SizeMismatch, StoredImage, image_for_storage
from vgdistill.errors import VGError

# A box edge further than this outside the image counts as clipped; smaller overhangs are the
# float rounding COCO boxes are known for (x + w = width + 0.01) and are clipped silently.
CLIP_TOLERANCE_PX = 1.0
MIN_BOX_PX = 1.0

Box = tuple[float, float, float, float]


def clean_expression(text: str) -> str:
    """Collapse whitespace; the phrase is otherwise kept as the source wrote it."""
    return " ".join(str(text).split())


def clip_box(box: Box, width: int, height: int) -> tuple[Box | None, str | None, bool]:
    """(clipped box or None, drop reason or None, clipped?) for a box in a width x height image."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box) or x2 <= x1 or y2 <= y1:
        return None, "degenerate box", False
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return None, "box outside image", False
    cx1, cy1 = max(0.0, x1), max(0.0, y1)
    cx2, cy2 = min(float(width), x2), min(float(height), y2)
    moved = max(abs(cx1 - x1), abs(cy1 - y1), abs(cx2 - x2), abs(cy2 - y2))
    if cx2 - cx1 < MIN_BOX_PX or cy2 - cy1 < MIN_BOX_PX:
        return None, "degenerate box", False
    return (cx1, cy1, cx2, cy2), None, moved > CLIP_TOLERANCE_PX


def objects_column(
    objects: tuple[tuple[str, Box], ...], width: int, height: int
) -> dict[str, list[Any]]:
    """The objects column of one row: boxes clipped to the image, degenerate ones dropped."""
    kept: dict[str, list[Any]] = {"category": [], "bbox": []}
    for category, box in objects:
        clipped, _, _ = clip_box(box, width, height)
        if clipped is not None:
            kept["category"].append(category)
            kept["bbox"].append(list(clipped))
    return kept


def image_key(image: str | bytes) -> str:
    """What identifies an image across rows: its path, or a hash of its bytes."""
    if isinstance(image, bytes):
        return "sha1:" + hashlib.sha1(image).hexdigest()
    return image


class StorableImageCache:
    """prepare's image check: each distinct image is validated (and re-encoded if needed) once.

    Turning a source image into the bytes a prepared dataset stores means decoding it, picking
    the frame its annotations were made in (exif.choose_frame, by the size the source gives)
    and re-encoding it when it is turned, CMYK, 16-bit, .... Rows of one image usually come
    together, so a small LRU of the stored bytes avoids redoing that once per expression without
    holding a whole dataset of images in memory; an image whose stored bytes are its file's own
    is only re-read (not decoded again) when it comes back later. This is not the training-time
    pixel cache (data/decoded.py): it holds encoded bytes, for writing.
    """

    def __init__(self, max_pixels: int, keep: int = 64, frame: str = "auto") -> None:
        self.max_pixels = max_pixels
        self.keep = keep
        self.frame = frame
        self.errors: dict[str, str] = {}  # unreadable image -> message
        self.mismatches: dict[str, str] = {}  # image whose size fits no frame -> message
        self.tagged: dict[str, int] = {}  # EXIF-tagged image -> orientation
        # key -> the stored image without its bytes (size, re-encoded?, orientation, frame)
        self.valid: dict[str, StoredImage] = {}
        self.recent: OrderedDict[str, StoredImage] = OrderedDict()

    @property
    def reencoded(self) -> int:
        """How many distinct images had to be re-encoded (turned, CMYK, 16-bit, ...)."""
        return sum(s.reencoded for s in self.valid.values())

    def get(
        self, key: str, image: str | bytes, size: tuple[int, int] | None = None
    ) -> StoredImage | str:
        """The storable image for `key` in the frame `size` implies, else the drop reason."""
        if size is not None:  # the frame depends on the size, so the size is part of the key
            key = f"{key}@{size[0]}x{size[1]}"
        if key in self.errors:
            return "unreadable image"
        if key in self.mismatches:
            return "image size mismatch"
        hit = self.recent.get(key)
        if hit is not None:
            self.recent.move_to_end(key)
            return hit
        known = self.valid.get(key)
        try:
            if known is not None and not known.reencoded and known.orientation == 1:
                data = image if isinstance(image, bytes) else Path(image).read_bytes()
                stored = replace(known, data=data)
            else:
                name = None if isinstance(image, bytes) else image
                stored = image_for_storage(
                    image, name=name, max_pixels=self.max_pixels, size=size, frame=self.frame
                )
        except SizeMismatch as e:
            self.mismatches[key] = str(e)
            if e.orientation != 1:
                self.tagged[key] = e.orientation
            return "image size mismatch"
        except VGError as e:
            self.errors[key] = str(e)
            return "unreadable image"
        except OSError as e:  # the file vanished or became unreadable since it was checked
            self.errors[key] = f"{image}: {e.strerror or e}"
            return "unreadable image"
        self.valid[key] = replace(stored, data=b"")
        if stored.orientation != 1:
            self.tagged[key] = stored.orientation
        self.recent[key] = stored
        if len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        return stored

    def merge(self, other: StorableImageCache) -> None:
        """Take in the outcomes another cache recorded (a `prepare --workers` process's)."""
        self.errors.update(other.errors)
        self.mismatches.update(other.mismatches)
        self.tagged.update(other.tagged)
        self.valid.update(other.valid)

    def exif_report(self) -> dict[str, Any]:
        """The manifest's EXIF counts: tagged images, by orientation, and the frame each got."""
        frames = Counter(
            self.valid[k].frame if k in self.valid else "size_matched_neither" for k in self.tagged
        )
        orientations = Counter(self.tagged.values())
        return {
            "rule": self.frame,
            "tagged": len(self.tagged),
            "orientations": {str(o): orientations[o] for o in sorted(orientations)},
            **{f: frames[f] for f in ("stored", "upright", "size_matched_neither")},
        }
