"""Training and evaluation transforms (TransVG's set), with the box following every geometric op.

Train (TransVG, sizes scaled by image_size / 640 so a 64-px recipe gets the same recipe):
  one of  (a) resize the long side to one of 448..640 (step 32)
          (b) resize the short side to 400/500/600, crop 384..600, resize the long side to
              one of 448..640 again
      (b) is chosen with p = 0.5, never when the phrase holds a spatial word, since a crop can
      change what "left" or "top" means. The crop (recipe key data.crop) keeps the whole target
      box ("whole", the default) or is the reference's ("transvg": 20 tries of a random size and
      place, the first whose box-centre test passes, a test that compares the centre's x with
      the crop's top and its y with the crop's left, so the crop can cut the box);
  colour jitter (brightness/contrast/saturation 0.4) with p = 0.8;
  horizontal flip with p = 0.5, swapping the whole words left <-> right ("bright" stays);
  pad to S x S at a random position; mask True on padding.
  `ops` (recipe key data.augment_ops) leaves any of resize, crop, jitter, flip and translate
  out: without resize the long side goes to S, without translate the padding is centred.
Eval: resize the long side to S, pad centred (top = round(dh/2 - 0.1), as the reference does).

The image leaves the transform as uint8 pixels with zeros on the padding: a quarter of the
bytes of a float image to build, collate and move to the device, where the model normalises it
(`vgdistill.models.visual.normalize_pixels`, ImageNet mean/std, padding exactly 0).

Boxes are absolute pixel xyxy in continuous coordinates (pixel i spans [i, i+1]), so a resize
by f maps x to f*x, a flip maps x to W - x and a crop or pad shifts x.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from vgdistill.data.spatial_words import has_spatial_word, swap_left_right
from vgdistill.recipe import AUGMENTATIONS
from vgdistill.recipe.schema import CROPS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_SIZE = 640
# TransVG's sizes at 640 px; scaled to the recipe's image_size.
_LONG_SIDES = tuple(640 - 32 * i for i in range(7))  # 640, 608, ..., 448
_SHORT_SIDES = (400, 500, 600)
_CROP_RANGE = (384, 600)
# The reference's RandomSizeCrop gives up (no crop) after this many draws fail its test.
TRANSVG_CROP_TRIES = 20
CROP_PROB = 0.5
JITTER_PROB = 0.8
JITTER_STRENGTH = 0.4
FLIP_PROB = 0.5

Box = np.ndarray  # float64 [4], absolute pixel xyxy


@dataclass(frozen=True)
class AugmentSizes:
    """TransVG's augmentation sizes scaled to one image size."""

    long_sides: tuple[int, ...]
    short_sides: tuple[int, ...]
    crop_min: int
    crop_max: int

    @classmethod
    def for_size(cls, image_size: int) -> AugmentSizes:
        """The sizes for `image_size` (TransVG's own at 640)."""
        f = image_size / REFERENCE_SIZE

        def scale(v: int) -> int:
            return max(1, round(v * f))

        longs = tuple(sorted({min(image_size, scale(v)) for v in _LONG_SIDES}, reverse=True))
        return cls(
            long_sides=longs,
            short_sides=tuple(scale(v) for v in _SHORT_SIDES),
            crop_min=scale(_CROP_RANGE[0]),
            crop_max=scale(_CROP_RANGE[1]),
        )


@dataclass
class Affine:
    """Per-axis map from original to current pixels: x' = sx * x + tx, y' = sy * y + ty."""

    sx: float = 1.0
    sy: float = 1.0
    tx: float = 0.0
    ty: float = 0.0

    def scale(self, fx: float, fy: float) -> None:
        """Compose with a resize."""
        self.sx, self.tx, self.sy, self.ty = self.sx * fx, self.tx * fx, self.sy * fy, self.ty * fy

    def shift(self, dx: float, dy: float) -> None:
        """Compose with a translation."""
        self.tx += dx
        self.ty += dy

    def mirror(self, width: float) -> None:
        """Compose with x -> width - x."""
        self.sx, self.tx = -self.sx, width - self.tx


# ---------------------------------------------------------------------------------------------
# Geometric ops: each takes and returns (image, box) so the box cannot be forgotten.


def resize(img: Image.Image, box: Box, width: int, height: int) -> tuple[Image.Image, Box]:
    """Resize to width x height (bilinear); the box scales per axis."""
    fx, fy = width / img.width, height / img.height
    out = img.resize((width, height), Image.BILINEAR) if (width, height) != img.size else img
    return out, box * np.array([fx, fy, fx, fy])


def long_side_size(w: int, h: int, long_side: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is `long_side` (aspect kept, at least 1 px)."""
    s = long_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def short_side_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """(w, h) scaled so the shorter side is `short_side`."""
    s = short_side / min(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def hflip(img: Image.Image, box: Box) -> tuple[Image.Image, Box]:
    """Mirror left-right; x1' = W - x2, x2' = W - x1."""
    w = img.width
    return img.transpose(Image.FLIP_LEFT_RIGHT), np.array([w - box[2], box[1], w - box[0], box[3]])


def crop(img: Image.Image, box: Box, region: tuple[int, int, int, int]) -> tuple[Image.Image, Box]:
    """Crop region (left, top, width, height); the box shifts and is clipped to the crop."""
    x0, y0, w, h = region
    out = img.crop((x0, y0, x0 + w, y0 + h))
    b = box - np.array([x0, y0, x0, y0], dtype=np.float64)
    return out, np.clip(b, 0, [w, h, w, h])


def sample_crop(
    size: tuple[int, int], box: Box, crop_min: int, crop_max: int, rng: random.Random
) -> tuple[int, int, int, int] | None:
    """A random crop (left, top, w, h) that contains the whole box, or None if none fits."""
    img_w, img_h = size
    x1, y1, x2, y2 = (float(v) for v in box)
    # One pixel of slack over the box size guarantees an integer offset exists below.
    w_lo, w_hi = max(crop_min, math.ceil(x2 - x1) + 1), min(img_w, crop_max)
    h_lo, h_hi = max(crop_min, math.ceil(y2 - y1) + 1), min(img_h, crop_max)
    if w_lo > w_hi or h_lo > h_hi:
        return None
    w, h = rng.randint(w_lo, w_hi), rng.randint(h_lo, h_hi)
    left_lo, left_hi = max(0, math.ceil(x2 - w)), min(math.floor(x1), img_w - w)
    top_lo, top_hi = max(0, math.ceil(y2 - h)), min(math.floor(y1), img_h - h)
    if left_lo > left_hi or top_lo > top_hi:
        return None
    return rng.randint(left_lo, left_hi), rng.randint(top_lo, top_hi), w, h


def sample_crop_transvg(
    size: tuple[int, int], box: Box, crop_min: int, crop_max: int, rng: random.Random
) -> tuple[int, int, int, int] | None:
    """The TransVG reference's crop (left, top, w, h), or None when every try fails.

    Each try draws a width in [crop_min, min(W, crop_max)], a height in [crop_min,
    min(H, crop_max)], then a top in [0, H - h] and a left in [0, W - w] (the reference's
    order); it is taken when the box centre's x exceeds the top and its y exceeds the left.
    That test mixes the axes as the reference does, so the crop can cut the box.
    """
    img_w, img_h = size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w_hi, h_hi = min(img_w, crop_max), min(img_h, crop_max)
    if w_hi < crop_min or h_hi < crop_min:
        return None  # the reference cannot draw a size here either (it raises)
    for _ in range(TRANSVG_CROP_TRIES):
        w, h = rng.randint(crop_min, w_hi), rng.randint(crop_min, h_hi)
        top, left = rng.randint(0, img_h - h), rng.randint(0, img_w - w)
        if cx > top and cy > left:
            return left, top, w, h
    return None


def colour_jitter(
    img: Image.Image, rng: random.Random, strength: float = JITTER_STRENGTH
) -> Image.Image:
    """Brightness, contrast and saturation factors in [1-s, 1+s], applied in random order."""
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(ops)
    for op in ops:
        img = op(img).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return img


def centred_padding(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) that centre a width x height image in size x size, as TransVG rounds it."""
    dw, dh = size - width, size - height
    return round(dw / 2.0 - 0.1), round(dh / 2.0 - 0.1)


def to_padded_tensor(
    img: Image.Image, size: int, left: int, top: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB image's uint8 pixels [3,S,S] placed at (left, top) in zeros; mask True on padding."""
    out = np.zeros((3, size, size), dtype=np.uint8)
    w, h = img.size
    # One plane at a time: copying PIL's planes is cheaper than transposing HWC to CHW.
    for c, plane in enumerate(img.split()):
        out[c, top : top + h, left : left + w] = np.asarray(plane)
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[top : top + h, left : left + w] = False
    return torch.from_numpy(out), mask


# ---------------------------------------------------------------------------------------------
# The pipelines


@dataclass
class Transformed:
    """One sample after the transform."""

    image: torch.Tensor  # uint8 [3, S, S], 0 on padding
    mask: torch.Tensor  # bool [S, S], True on padding
    box: torch.Tensor | None  # float32 [4], normalised cxcywh in the padded frame
    box_xyxy: np.ndarray | None  # float64 [4], pixels in the padded frame (None: no box given)
    phrase: str
    # Original -> padded pixels: padded = scale * orig + pad, per axis (x exact, y up to the
    # resize rounding). Crops fold into pad; a flip makes scale negative.
    scale: float
    pad: tuple[float, float]
    flipped: bool = False


class GroundingTransform:
    """TransVG preprocessing: `augment=True` for training, else the deterministic eval path;
    `crop` is data.crop ("whole" or "transvg")."""

    def __init__(
        self,
        image_size: int,
        augment: bool,
        ops: Sequence[str] = AUGMENTATIONS,
        crop: str = "whole",
    ) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.size = int(image_size)
        self.augment = augment
        self.ops = frozenset(ops)
        self.sizes = AugmentSizes.for_size(self.size)
        self.sample_crop = sample_crop_transvg if crop == "transvg" else sample_crop

    def __call__(
        self,
        img: Image.Image,
        box_xyxy: np.ndarray | list[float] | tuple[float, ...] | None,
        phrase: str,
        rng: random.Random | None = None,
    ) -> Transformed:
        """Transform an RGB image, its target box (pixel xyxy; None at predict time), phrase."""
        if box_xyxy is None:
            # No target (predict): carry the whole image as a stand-in, drop it at the end.
            box = np.array([0.0, 0.0, img.width, img.height])
        else:
            box = np.asarray(box_xyxy, dtype=np.float64).copy()
        if self.augment:
            out = self._train(img, box, phrase, rng or random.Random())
        else:
            out = self._eval(img, box, phrase, flipped=False)
        if box_xyxy is None:
            out.box = out.box_xyxy = None
        return out

    def fixed(
        self, img: Image.Image, box_xyxy: np.ndarray | list[float], phrase: str, flipped: bool
    ) -> Transformed:
        """The eval transform, mirrored when `flipped`: training's output for that flip draw
        whenever augment_ops holds nothing but "flip" (no resize, crop, jitter or translate)."""
        return self._eval(img, np.asarray(box_xyxy, dtype=np.float64).copy(), phrase, flipped)

    def fixed_flips(self) -> tuple[bool, ...] | None:
        """The flips under which `fixed` gives every form this transform can output: (False,)
        or (False, True); None when an op other than "flip" changes the pixels at random."""
        if not self.augment:
            return (False,)
        if self.ops - {"flip"}:
            return None
        return (False, True) if "flip" in self.ops else (False,)

    def fixed_boxes(self, sizes: np.ndarray, boxes: np.ndarray, flipped: bool) -> np.ndarray:
        """`fixed`'s target boxes without touching pixels: sizes [N,2] (width, height) and
        pixel xyxy boxes [N,4] -> normalised cxcywh [N,4] in the padded frame (float32)."""
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        # The same rounding as long_side_size and the per-axis factors of resize().
        s = self.size / sizes.max(axis=1)
        new = np.maximum(1, np.round(sizes * s[:, None]))
        f = new / sizes
        b = b * np.concatenate([f, f], axis=1)
        if flipped:
            b = np.stack([new[:, 0] - b[:, 2], b[:, 1], new[:, 0] - b[:, 0], b[:, 3]], axis=1)
        b = np.clip(b, 0, np.concatenate([new, new], axis=1))
        dw, dh = self.size - new[:, 0], self.size - new[:, 1]
        # centred_padding's rounding, vectorised (np.round and round() both round half to even).
        offset = np.stack([np.round(dw / 2.0 - 0.1), np.round(dh / 2.0 - 0.1)], axis=1)
        b = b + np.concatenate([offset, offset], axis=1)
        x1, y1, x2, y2 = b.T
        cxcywh = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)
        return (cxcywh / self.size).astype(np.float32)

    def _finish(
        self,
        img: Image.Image,
        box: Box,
        phrase: str,
        affine: Affine,
        left: int,
        top: int,
        flipped: bool,
    ) -> Transformed:
        image, mask = to_padded_tensor(img, self.size, left, top)
        affine.shift(left, top)
        b = np.clip(box, 0, [img.width, img.height, img.width, img.height])
        b = b + np.array([left, top, left, top], dtype=np.float64)
        cxcywh = (
            np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]) / self.size
        )
        return Transformed(
            image=image,
            mask=mask,
            box=torch.tensor(cxcywh, dtype=torch.float32),
            box_xyxy=b,
            phrase=phrase,
            scale=affine.sx,
            pad=(affine.tx, affine.ty),
            flipped=flipped,
        )

    def _eval(self, img: Image.Image, box: Box, phrase: str, flipped: bool) -> Transformed:
        affine = Affine()
        w, h = long_side_size(img.width, img.height, self.size)
        s = self.size / max(img.width, img.height)
        img, box = resize(img, box, w, h)
        # The reference maps predictions back with one ratio; keep that (not per-axis rounding).
        affine.scale(s, s)
        if flipped:
            affine.mirror(img.width)
            img, box = hflip(img, box)
            phrase = swap_left_right(phrase)
        left, top = centred_padding(img.width, img.height, self.size)
        return self._finish(img, box, phrase, affine, left, top, flipped)

    def _train(self, img: Image.Image, box: Box, phrase: str, rng: random.Random) -> Transformed:
        affine = Affine()
        sz = self.sizes

        def do_resize(im: Image.Image, b: Box, wh: tuple[int, int]) -> tuple[Image.Image, Box]:
            affine.scale(wh[0] / im.width, wh[1] / im.height)
            return resize(im, b, *wh)

        ops = self.ops
        if "crop" in ops and not has_spatial_word(phrase) and rng.random() < CROP_PROB:
            short = rng.choice(sz.short_sides)
            img, box = do_resize(img, box, short_side_size(img.width, img.height, short))
            region = self.sample_crop(img.size, box, sz.crop_min, sz.crop_max, rng)
            if region is not None:
                img, box = crop(img, box, region)
                affine.shift(-region[0], -region[1])
        long = rng.choice(sz.long_sides) if "resize" in ops else self.size
        img, box = do_resize(img, box, long_side_size(img.width, img.height, long))
        if "jitter" in ops and rng.random() < JITTER_PROB:
            img = colour_jitter(img, rng)
        flipped = "flip" in ops and rng.random() < FLIP_PROB
        if flipped:
            affine.mirror(img.width)
            img, box = hflip(img, box)
            phrase = swap_left_right(phrase)
        if "translate" in ops:
            left = rng.randint(0, self.size - img.width)
            top = rng.randint(0, self.size - img.height)
        else:
            left, top = centred_padding(img.width, img.height, self.size)
        return self._finish(img, box, phrase, affine, left, top, flipped)
