"""What `vgdistill predict` adds to the `Grounder` API: drawing, output files, JSONL batches.

Boxes are pixel xyxy in the upright image (EXIF orientation applied), as `Grounder` returns
them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vgdistill.data.images import ImageIndex
from vgdistill.errors import VGError
from vgdistill.tools.grounder import (
    Grounder,
    Grounding,
    InvalidText,
    as_rgb_image,
    check_unicode,
    clean_phrase,
)


def render(
    image: Image.Image, groundings: Sequence[Grounding], show_attention: bool = False
) -> Image.Image:
    """The image with every box and phrase drawn (and the attention heat maps under them)."""
    from vgdistill.report.draw import colour_for, draw_boxes, overlay_heat

    canvas = image.convert("RGB")
    colours = [colour_for(i) for i in range(len(groundings))]
    if show_attention:
        heats = [g.heat for g in groundings if g.heat is not None]
        if len(heats) == 1:
            canvas = overlay_heat(canvas, heats[0])
        else:  # one tint per phrase, in its box colour, so the maps stay apart
            for g, colour in zip(groundings, colours, strict=True):
                if g.heat is not None:
                    canvas = overlay_heat(canvas, g.heat, colour=colour, strength=0.5)
    return draw_boxes(canvas, [g.box for g in groundings], [g.phrase for g in groundings], colours)


def image_format(path: Path) -> str:
    """The PIL format an output file name asks for (.png -> PNG); VGError if none."""
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise VGError(f"--out {path}: unknown image extension {ext or '(none)'!r}; use .png")
    return fmt


def encode_image(image: Image.Image, path: Path) -> bytes:
    """`image` encoded in the format its file name asks for (PNG, JPEG, ...)."""
    fmt = image_format(path)
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except (OSError, KeyError, ValueError) as e:
        raise VGError(f"--out {path}: cannot write {fmt} ({e}); use .png") from None
    return buf.getvalue()


# --------------------------------------------------------------------------- batch mode


@dataclass
class BatchItem:
    """One line of a batch file."""

    line: int
    where: str
    """'FILE line N', for messages."""
    record: dict[str, Any]
    image: Path | None
    phrase: str | None
    error: str | None = None
    """Why this line gets no box (text that is not valid Unicode); the other lines go on."""


def _read_item(n: int, where: str, raw: str, folder: Path) -> BatchItem:
    """One non-blank line as a BatchItem; VGError for a line that stops the batch."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise VGError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise VGError(f'{where}: expected an object like {{"image": ..., "phrase": ...}}')
    missing = [k for k in ("image", "phrase") if k not in record]
    if missing:
        raise VGError(f"{where}: missing {' and '.join(map(repr, missing))}")
    if not isinstance(record["image"], str) or not record["image"].strip():
        raise VGError(f"{where}: 'image' must be a file path")
    try:
        check_unicode(record["image"], "'image'")
        phrase = clean_phrase(record["phrase"], "'phrase'")
    except InvalidText as e:
        return BatchItem(n, where, record, None, None, error=f"{where}: {e}")
    except VGError as e:
        raise VGError(f"{where}: {e}") from None
    image = Path(record["image"]).expanduser()
    if not image.is_absolute() and not image.exists() and (folder / image).exists():
        image = folder / image
    if not image.is_file():
        raise VGError(f"{where}: image not found: {record['image']}")
    return BatchItem(n, where, record, image, phrase)


def read_batch(path: Path) -> list[BatchItem]:
    """Parse a JSONL batch file ({"image": ..., "phrase": ...} per line), checking every line.

    Relative image paths are looked up in the current folder, then beside the batch file.
    A bad line raises a VGError naming its line number, before a model is loaded; a line
    whose text is not valid Unicode is kept as an item with an `error`, and the rest go on.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VGError(f"--batch file not found: {path}") from None
    except IsADirectoryError:
        raise VGError(f"--batch expects a JSONL file, got a folder: {path}") from None
    except UnicodeDecodeError:
        raise VGError(f"--batch {path}: not UTF-8 text") from None
    items = [
        _read_item(n, f"{path} line {n}", raw, path.parent)
        for n, raw in enumerate(text.splitlines(), 1)
        if raw.strip()
    ]
    if not items:
        raise VGError(f"--batch {path} has no lines to predict")
    return items


def predict_batch(
    grounder: Grounder,
    items: Sequence[BatchItem],
    on_item: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One result record per item, in order: the input fields plus line and box, width and
    height (pixels of the upright image), or plus line and error for an item that has one.

    Items that share an image are grounded together (one decode, one visual pass).
    """
    results: list[dict[str, Any]] = [
        {**item.record, "line": item.line, "error": item.error} for item in items
    ]
    todo = [
        (i, item.image, item.phrase)
        for i, item in enumerate(items)
        if item.image is not None and item.phrase is not None
    ]
    if on_item is not None and len(todo) < len(items):
        on_item(len(items) - len(todo))
    by_image = ImageIndex.from_ids([image.resolve() for _, image, _ in todo])
    for group in by_image.rows_of():
        _, image, _ = todo[group[0]]
        try:
            img = as_rgb_image(image)
        except VGError as e:
            raise VGError(f"{items[todo[group[0]][0]].where}: {e}") from None
        found = grounder.ground(img, [todo[k][2] for k in group])
        for k, g in zip(group, found, strict=True):
            i = todo[k][0]
            results[i] = {
                **items[i].record,
                "line": items[i].line,
                "box": [round(v, 2) for v in g.box],
                "width": img.width,
                "height": img.height,
            }
        if on_item is not None:
            on_item(len(group))
    return results
