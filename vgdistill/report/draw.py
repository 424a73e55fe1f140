"""Drawing predictions with PIL: boxes, phrase labels and attention heat maps.

Everything is drawn at the image's own size. Box lines and label fonts scale with the image,
each phrase gets its own colour from a palette chosen to stay distinct (and to survive the
common forms of colour blindness), and every line and label has a dark halo or a solid
background so it reads on any photo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Okabe-Ito's colour-blind-safe set first, then strong extras for many phrases.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
    (255, 255, 255),  # white
    (148, 103, 189),  # violet
    (23, 190, 207),  # cyan
    (188, 189, 34),  # olive
    (227, 119, 194),  # pink
)
HALO = (20, 20, 20)
# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno").
_HEAT_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def colour_for(index: int) -> tuple[int, int, int]:
    """The palette colour of the index-th phrase (cycles after the palette runs out)."""
    return PALETTE[index % len(PALETTE)]


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `background` (relative luminance)."""
    r, g, b = (c / 255.0 for c in background)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if luminance > 0.5 else (255, 255, 255)


def line_width(size: tuple[int, int]) -> int:
    """Box line width for an image of `size`: about 0.4 % of the long side, at least 1 px."""
    return max(1, round(max(size) / 250))


def font_size(size: tuple[int, int]) -> int:
    """Label font size for an image of `size`: 3 % of the long side, within 9..48 px."""
    return int(min(48, max(9, round(max(size) * 0.03))))


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled scalable font at `size` px (its bitmap font on very old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: object, max_width: int) -> str:
    """`text`, shortened with '...' so that it is at most `max_width` px wide."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid].rstrip() + "...", font=font) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..."


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label_row(
    y1: int,
    y2: int,
    lx: int,
    tw: int,
    th: int,
    lw: int,
    height: int,
    placed: list[tuple[int, int, int, int]],
) -> int:
    """The top of a label: above the box, else stacked above an earlier label, else inside
    the box's top edge, else below: the first that fits without covering an earlier label."""
    candidates = [y1 - lw - th, *(p[1] - th for p in placed), y1, y2 + lw]
    candidates += [p[3] for p in placed]
    for ly in candidates:
        rect = (lx, ly, lx + tw, ly + th)
        if ly >= 0 and ly + th <= height and not any(_overlaps(rect, p) for p in placed):
            return ly
    return min(max(0, y1 - lw - th), max(0, height - th))


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
    colours: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """A copy of `image` with each pixel-xyxy box outlined and labelled in its own colour.

    Labels sit on a solid background in the box colour, above the box when there is room
    (else just inside its top edge), kept inside the image and moved down when they would
    cover an earlier label.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width, height = out.size
    lw = line_width(out.size)
    font = load_font(font_size(out.size))
    colours = list(colours) if colours is not None else [colour_for(i) for i in range(len(boxes))]
    # Boxes first, so that no box line runs across a label drawn later.
    for box, colour in zip(boxes, colours, strict=True):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        x2, y2 = max(x1, x2 - 1), max(y1, y2 - 1)  # xyxy edges -> last pixel inside
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=HALO, width=lw + 2)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=lw)
    placed: list[tuple[int, int, int, int]] = []
    pad = max(1, lw)
    for box, label, colour in zip(boxes, labels, colours, strict=True):
        x1, y1, _, y2 = (round(float(v)) for v in box)
        text = _fit_text(draw, label, font, max(1, width - 2 * pad))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        lx = min(max(0, x1), max(0, width - tw))
        ly = _label_row(y1, y2, lx, tw, th, lw, height, placed)
        rect = (lx, ly, lx + tw, ly + th)
        placed.append(rect)
        draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=colour, outline=HALO)
        draw.text((lx + pad - left, ly + pad - top), text, fill=text_colour(colour), font=font)
    return out


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 along a dark-purple -> yellow heat scale."""
    t = np.clip(np.nan_to_num(heat.astype(np.float64)), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lo = np.floor(t).astype(np.int64)
    hi = np.minimum(lo + 1, len(_HEAT_ANCHORS) - 1)
    frac = (t - lo)[..., None]
    rgb = _HEAT_ANCHORS[lo] * (1 - frac) + _HEAT_ANCHORS[hi] * frac
    return rgb.round().astype(np.uint8)


def overlay_heat(
    image: Image.Image,
    heat: np.ndarray,
    colour: tuple[int, int, int] | None = None,
    strength: float = 0.65,
) -> Image.Image:
    """Blend a [H, W] heat map (0..1, the image's size) onto `image`.

    With `colour`, the heat tints the image in that colour (one tint per phrase when several
    are shown); without, it is drawn on a heat scale. Opacity grows with the heat, so cold
    areas leave the photo visible.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match the image {base.shape[:2]}")
    h = np.clip(np.nan_to_num(heat.astype(np.float64)), 0.0, 1.0)
    if colour is None:
        paint = heat_colours(h).astype(np.float64)
        alpha = strength * (0.25 + 0.75 * h)[..., None]  # the whole map shows, hot parts most
    else:
        paint = np.broadcast_to(np.array(colour, dtype=np.float64), base.shape)
        alpha = strength * h[..., None]
    mixed = base * (1 - alpha) + paint * alpha
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8), mode="RGB")
