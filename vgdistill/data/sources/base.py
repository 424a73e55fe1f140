"""What a data source is: the options it reads, the files it depends on, the rows it yields."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vgdistill.errors import VGError

# Which frame prepare keeps an EXIF-tagged image in (data/exif.py choose_frame).
EXIF_FRAMES = ("auto", "stored", "upright")


@dataclass
class RawRow:
    """One expression as a source reads it, before cleaning.

    `image` is a file path (str) or encoded image bytes; `bbox_xyxy` is absolute pixels in the
    frame the annotation was made in (sources convert xywh to xyxy, nothing else).
    `image_size` is the (width, height) the source gives for that image, if it gives one:
    prepare keeps the image in the frame (stored or EXIF-upright pixels) of that size.
    `objects` lists every annotated object of the image as (category, box xyxy) when the source
    knows them (`vgdistill detector` trains on them); sources without such annotations leave it
    empty.
    """

    image: str | bytes
    expression: str
    bbox_xyxy: tuple[float, float, float, float]
    image_id: str
    ref_id: str
    split: str
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()
    image_size: tuple[int, int] | None = None


@dataclass
class SourceArgs:
    """Everything `vgdistill prepare` may pass to a source; each source reads what it needs."""

    root: Path | None = None
    images: Path | None = None
    split_by: str | None = None
    format: str = "auto"
    splits: list[str] | None = None
    seed: int = 0
    rows: int | None = None
    split_rows: dict[str, int] | None = None
    image_size: int = 64
    train_mix: str = "natural"
    exif_frame: str = "auto"

    def __post_init__(self) -> None:
        # Checked here, before anything is read (exif.choose_frame applies it).
        if self.exif_frame not in EXIF_FRAMES:
            raise VGError(
                f"--exif-frame must be one of {', '.join(EXIF_FRAMES)}, got {self.exif_frame!r}"
            )


@dataclass(frozen=True)
class Source:
    """A registered data source.

    `inputs(args)` validates the arguments and returns the files and folders whose sizes and
    modification times fingerprint the input (VGError when something is missing);
    `rows(args)` yields the raw rows; `options` names the SourceArgs fields the source reads
    (they go into the manifest and the cache fingerprint).
    """

    name: str
    expects: str
    options: tuple[str, ...]
    inputs: Callable[[SourceArgs], list[Path]]
    rows: Callable[[SourceArgs], Iterator[RawRow]]
    example: str = ""
    notes: list[str] = field(default_factory=list)


def annotated_size(width: object, height: object) -> tuple[int, int] | None:
    """(width, height) as ints when both are positive whole numbers, else None (size unknown)."""
    try:
        w, h = float(width), float(height)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not (w > 0 and h > 0 and w.is_integer() and h.is_integer()):
        return None
    return int(w), int(h)


def xywh_to_xyxy(box: object, what: str) -> tuple[float, float, float, float]:
    """[x, y, w, h] -> (x1, y1, x2, y2) as floats; VGError naming `what` when malformed."""
    x, y, w, h = four_floats(box, what)
    return (x, y, x + w, y + h)


def four_floats(box: object, what: str) -> tuple[float, float, float, float]:
    """A 4-number box as a float tuple; VGError naming `what` when it is not one."""
    try:
        values = [float(v) for v in box]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise VGError(f"{what}: bbox must be 4 numbers, got {box!r}") from None
    if len(values) != 4:
        raise VGError(f"{what}: bbox must be 4 numbers, got {len(values)}")
    return (values[0], values[1], values[2], values[3])


_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_SPLIT_NAME = re.compile(r"^\w+$")


def normalise_split(name: str, what: str) -> str:
    """Canonical split name ('validation' -> 'val'); VGError if it cannot be a folder name."""
    name = str(name).strip()
    name = _SPLIT_ALIASES.get(name.lower(), name)
    if not _SPLIT_NAME.match(name):
        raise VGError(f"{what}: split name {name!r} must be letters, digits or underscores")
    return name


def want_split(split: str, args: SourceArgs) -> bool:
    """True when --splits is unset or names this split."""
    return args.splits is None or split in args.splits
