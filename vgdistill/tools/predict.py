"""Ground phrases on images with a trained checkpoint: the `Predictor` API behind `predict`.

The model is loaded once; every phrase of an image goes through the model in one batch. Images
are decoded by `vgdistill.data.images.load_image` (EXIF, modes, limits as in `prepare`) and
preprocessed by the evaluation transform, so a prediction here equals what `eval` scores.
Boxes come back as pixel xyxy in the ORIGINAL image, clamped inside it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vgdistill.data.images import ImageIndex, load_image
from vgdistill.device import resolve_device, set_cuda_speed_flags
from vgdistill.errors import VGError

Box = tuple[float, float, float, float]
ImageInput = str | os.PathLike | bytes | Image.Image


@dataclass
class Grounding:
    """One phrase grounded on one image."""

    phrase: str
    box: Box
    """Pixel xyxy in the original image (continuous coordinates, 0..width / 0..height)."""
    heat: np.ndarray | None = field(default=None, repr=False)
    """[height, width] float32 in 0..1: where [REG] attends in the last fusion layer."""


def check_phrases(phrases: Sequence[str], where: str = "phrase") -> list[str]:
    """The phrases with outer spaces removed; VGError for none given or an empty one."""
    if not phrases:
        raise VGError(f'give at least one {where} to ground, e.g. "the red circle"')
    out = []
    for i, phrase in enumerate(phrases, 1):
        if not isinstance(phrase, str):
            raise VGError(f"{where} {i} must be text, got {type(phrase).__name__}")
        text = " ".join(phrase.split())
        if not text:
            label = where if len(phrases) == 1 else f"{where} {i}"
            raise VGError(f'{label} is empty; give the words to ground, e.g. "the red circle"')
        out.append(text)
    return out


def as_rgb_image(image: ImageInput, name: str | None = None) -> Image.Image:
    """An upright RGB PIL image from a path, encoded bytes or a PIL image."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return image
        # Other modes go through the one decoder, so alpha, 16-bit etc. match `prepare`.
        buf = io.BytesIO()
        try:
            image.save(buf, format="PNG")
        except OSError:  # a mode PNG cannot hold (e.g. 32-bit float): plain conversion
            return image.convert("RGB")
        return load_image(buf.getvalue(), name=name or "<PIL image>")
    return load_image(image, name=name)


class Predictor:
    """A checkpoint loaded once, ready to ground phrases: `Predictor(path).predict(img, [...])`."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None) -> None:
        from vgdistill.data.transforms import GroundingTransform
        from vgdistill.models.checkpoint import load_checkpoint, resolve_checkpoint
        from vgdistill.models.factory import build_tokenizer

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.checkpoint = resolve_checkpoint(path)
        self.model, self.recipe = load_checkpoint(self.checkpoint, self.device)
        set_cuda_speed_flags(self.device)
        self.model.eval()
        self.tokenizer = build_tokenizer(self.recipe.model)
        self.image_size = self.recipe.data.image_size
        self.max_query_len = self.recipe.data.max_query_len
        self.transform = GroundingTransform(self.image_size, augment=False)
        self.batch_size = max(1, self.recipe.eval.batch_size)

    def predict(self, image: ImageInput, phrases: Sequence[str] | str) -> list[Box]:
        """One pixel xyxy box per phrase, in the original image's pixels."""
        return [g.box for g in self.ground(image, phrases)]

    @torch.no_grad()
    def ground(
        self, image: ImageInput, phrases: Sequence[str] | str, attention: bool = False
    ) -> list[Grounding]:
        """Ground each phrase on `image`; with attention=True each result carries a heat map."""
        from vgdistill.data.loader import encode_phrase
        from vgdistill.evaluation.evaluate import to_original_xyxy

        if isinstance(phrases, str):
            phrases = [phrases]
        texts = check_phrases(list(phrases))
        img = as_rgb_image(image)
        t = self.transform(img, None, "")
        results: list[Grounding] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            n = len(chunk)
            encoded = [encode_phrase(self.tokenizer, p, self.max_query_len) for p in chunk]
            ids = torch.tensor([e[0] for e in encoded], dtype=torch.int64, device=self.device)
            mask = torch.tensor([e[1] for e in encoded], dtype=torch.int64, device=self.device)
            image_t = t.image.to(self.device).unsqueeze(0).expand(n, -1, -1, -1)
            mask_t = t.mask.to(self.device).unsqueeze(0).expand(n, -1, -1)
            out = self.model(image_t, mask_t, ids, mask, return_attention=attention)
            boxes = to_original_xyxy(
                out.pred_boxes.float().cpu(),
                self.image_size,
                torch.full((n,), t.scale, dtype=torch.float32),
                torch.tensor([t.pad], dtype=torch.float32).expand(n, 2),
                torch.tensor([[img.width, img.height]], dtype=torch.int64).expand(n, 2),
            )
            for i, phrase in enumerate(chunk):
                heat = None
                if attention and out.attention is not None and out.feature_hw is not None:
                    heat = attention_heat(
                        out.attention[i].float().cpu().numpy(),
                        out.feature_hw,
                        self.image_size,
                        t.scale,
                        t.pad,
                        img.size,
                    )
                x1, y1, x2, y2 = (float(v) for v in boxes[i].tolist())
                results.append(Grounding(phrase=phrase, box=(x1, y1, x2, y2), heat=heat))
        return results


def attention_heat(
    attention: np.ndarray,
    feature_hw: tuple[int, int],
    image_size: int,
    scale: float,
    pad: tuple[float, float],
    orig_size: tuple[int, int],
) -> np.ndarray:
    """[REG]->visual attention over the token grid -> [H, W] heat in 0..1 on the original image.

    The grid covers the padded SxS frame; it is upsampled to that frame, the part the image
    occupies (orig = (padded - pad) / scale) is cut out and resized to the original size.
    """
    h, w = feature_hw
    grid = np.asarray(attention, dtype=np.float32).reshape(h, w)
    frame = Image.fromarray(grid, mode="F").resize((image_size, image_size), Image.BILINEAR)
    width, height = orig_size
    left, top = float(pad[0]), float(pad[1])
    region = (left, top, left + width * scale, top + height * scale)
    heat = frame.resize((width, height), Image.BILINEAR, box=region)
    arr = np.asarray(heat, dtype=np.float32)
    top_value = float(arr.max()) if arr.size else 0.0
    return arr / top_value if top_value > 0 else arr


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
    image: Path
    phrase: str


def read_batch(path: Path) -> list[BatchItem]:
    """Parse a JSONL batch file ({"image": ..., "phrase": ...} per line), checking every line.

    Relative image paths are looked up in the current folder, then beside the batch file.
    Any bad line raises a VGError naming its line number, before a model is loaded.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VGError(f"--batch file not found: {path}") from None
    except IsADirectoryError:
        raise VGError(f"--batch expects a JSONL file, got a folder: {path}") from None
    except UnicodeDecodeError:
        raise VGError(f"--batch {path}: not UTF-8 text") from None
    items: list[BatchItem] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
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
            (phrase,) = check_phrases([record["phrase"]], where="'phrase'")
        except VGError as e:
            raise VGError(f"{where}: {e}") from None
        image = Path(record["image"]).expanduser()
        if not image.is_absolute() and not image.exists() and (path.parent / image).exists():
            image = path.parent / image
        if not image.is_file():
            raise VGError(f"{where}: image not found: {record['image']}")
        items.append(BatchItem(n, where, record, image, phrase))
    if not items:
        raise VGError(f"--batch {path} has no lines to predict")
    return items


def predict_batch(
    predictor: Predictor,
    items: Sequence[BatchItem],
    on_item: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One result record per item, in order: the input fields plus box, width, height, line.

    Items that share an image are grounded together (the image is decoded once).
    """
    by_image = ImageIndex.from_ids([item.image.resolve() for item in items])
    results: list[dict[str, Any] | None] = [None] * len(items)
    for indices in by_image.rows_of():
        first = items[indices[0]]
        try:
            img = load_image(first.image)
        except VGError as e:
            raise VGError(f"{first.where}: {e}") from None
        found = predictor.ground(img, [items[i].phrase for i in indices])
        for i, g in zip(indices, found, strict=True):
            results[i] = {
                **items[i].record,
                "line": items[i].line,
                "box": [round(v, 2) for v in g.box],
                "width": img.width,
                "height": img.height,
            }
            if on_item is not None:
                on_item(1)
    return [r for r in results if r is not None]
