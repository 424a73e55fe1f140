"""Transforms: the box follows the pixels through every geometric op (property tests)."""

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vgdistill.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSizes,
    GroundingTransform,
    centred_padding,
    crop,
    has_spatial_word,
    hflip,
    long_side_size,
    resize,
    sample_crop,
    short_side_size,
    swap_left_right,
    to_padded_tensor,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1.5  # px: bilinear resampling moves a thresholded edge by at most about one pixel


@st.composite
def image_and_box(draw, min_side=16, max_side=120, margin=0):
    """A mask image (white box on black) and its integer box, the box at least 6 px wide.

    `margin` keeps that much black around the box, so the image is never one flat colour.
    """
    w = draw(st.integers(min_side, max_side))
    h = draw(st.integers(min_side, max_side))
    x1 = draw(st.integers(margin, w - 6 - margin))
    y1 = draw(st.integers(margin, h - 6 - margin))
    x2 = draw(st.integers(x1 + 6, w - margin))
    y2 = draw(st.integers(y1 + 6, h - margin))
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask, "L"), np.array([x1, y1, x2, y2], dtype=np.float64)


def mask_box(arr: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Bounding box (continuous xyxy) of the bright pixels, thresholded halfway."""
    arr = np.asarray(arr, dtype=np.float64)
    if valid is None:
        valid = np.ones(arr.shape, dtype=bool)
    lo, hi = arr[valid].min(), arr[valid].max()
    # A flat image is all box (the box drawn over the whole image).
    threshold = (lo + hi) / 2 if hi - lo >= 1 else lo - 1
    ys, xs = np.nonzero((arr > threshold) & valid)
    assert len(xs), "the box vanished"
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def assert_close(a, b, tol=TOL):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= tol, (a, b)


@FAST
@given(image_and_box(), st.floats(0.4, 3.0), st.floats(0.4, 3.0))
def test_resize_moves_the_box_with_the_pixels(sample, fx, fy):
    img, box = sample
    w, h = max(8, round(img.width * fx)), max(8, round(img.height * fy))
    out, b = resize(img, box, w, h)
    assume((b[2] - b[0]) >= 3 and (b[3] - b[1]) >= 3)
    assert out.size == (w, h)
    assert_close(mask_box(np.asarray(out)), b)


@FAST
@given(image_and_box())
def test_flip_mirrors_the_box(sample):
    img, box = sample
    out, b = hflip(img, box)
    assert_close(mask_box(np.asarray(out)), b, tol=0)
    back, b2 = hflip(out, b)
    assert np.array_equal(np.asarray(back), np.asarray(img)) and np.allclose(b2, box)


@FAST
@given(image_and_box(min_side=30), st.integers(0, 2**32 - 1))
def test_crop_keeps_the_target_inside(sample, seed):
    img, box = sample
    rng = random.Random(seed)
    region = sample_crop(img.size, box, 12, 100, rng)
    assume(region is not None)
    x0, y0, w, h = region
    assert x0 <= box[0] and y0 <= box[1] and x0 + w >= box[2] and y0 + h >= box[3]
    out, b = crop(img, box, region)
    assert out.size == (w, h)
    assert_close(mask_box(np.asarray(out)), b, tol=0)


@FAST
@given(image_and_box(max_side=64), st.integers(0, 2**32 - 1))
def test_padding_shifts_the_box_and_masks_the_rest(sample, seed):
    img, box = sample
    rng = random.Random(seed)
    left, top = rng.randint(0, 64 - img.width), rng.randint(0, 64 - img.height)
    tensor, pad_mask = to_padded_tensor(img.convert("RGB"), 64, left, top)
    assert tensor.shape == (3, 64, 64) and pad_mask.shape == (64, 64)
    assert int((~pad_mask).sum()) == img.width * img.height
    assert (tensor[:, pad_mask] == 0).all()  # padding is zero after normalisation
    gray = tensor[0].numpy()
    assert_close(mask_box(gray, ~pad_mask.numpy()), box + [left, top, left, top], tol=0)


def _target_image(w, h, box):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    arr[y1:y2, x1:x2] = 255
    return Image.fromarray(arr, "RGB")


def _unnormalise(t: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((t * std + mean).clamp(0, 1) * 255).mean(0).numpy()


PHRASES = ["the dog on the left", "a bright red cup", "small square", "top right corner"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    image_and_box(min_side=24, max_side=160, margin=4),
    st.integers(0, 2**32 - 1),
    st.sampled_from(PHRASES),
)
def test_train_pipeline_box_matches_the_pixels(sample, seed, phrase):
    mask_img, box = sample
    img = _target_image(mask_img.width, mask_img.height, box)
    out = GroundingTransform(64, augment=True)(img, box, phrase, random.Random(seed))
    pad = out.mask.numpy()
    assert out.image.shape == (3, 64, 64) and out.mask.dtype == torch.bool
    b = out.box_xyxy
    assume((b[2] - b[0]) >= 3 and (b[3] - b[1]) >= 3)
    assert_close(mask_box(_unnormalise(out.image), ~pad), b, tol=2.0)
    # The normalised cxcywh target is the same box.
    cx, cy, w, h = (out.box.numpy() * 64).tolist()
    assert_close([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], b, tol=1e-3)
    assert out.phrase == (swap_left_right(phrase) if out.flipped else phrase)
    if not out.flipped:  # the affine map back to the original is exact up to rounding
        assert_close((b[[0, 2]] - out.pad[0]) / out.scale, box[[0, 2]], tol=1.0)


def test_eval_is_deterministic_centred_and_maps_back():
    img = _target_image(100, 50, [10, 5, 40, 30])
    t = GroundingTransform(64, augment=False)
    a, b = t(img, [10, 5, 40, 30], "left one"), t(img, [10, 5, 40, 30], "left one")
    assert torch.equal(a.image, b.image) and torch.equal(a.box, b.box)
    assert a.phrase == "left one"  # never flipped in eval
    left, top = centred_padding(64, 32, 64)
    assert (left, top) == (0, round(32 / 2 - 0.1)) == (0, 16)
    assert a.pad == (0.0, 16.0) and a.scale == pytest.approx(0.64)
    rows = np.nonzero((~a.mask.numpy()).any(axis=1))[0]  # rows holding image pixels
    assert rows.min() == 16 and rows.max() == 47
    orig = (a.box_xyxy - [a.pad[0], a.pad[1], a.pad[0], a.pad[1]]) / a.scale
    assert_close(orig, [10, 5, 40, 30], tol=0.5)
    # predict has no box: same pixels, no target
    p = t(img, None, "left one")
    assert torch.equal(p.image, a.image) and p.box is None and (p.scale, p.pad) == (a.scale, a.pad)


def test_flip_only_keeps_the_frame_and_mirrors_image_box_and_phrase():
    img = _target_image(64, 64, [4, 10, 20, 30])
    plain = GroundingTransform(64, augment=False)(img, [4, 10, 20, 30], "the left cup")
    t = GroundingTransform(64, augment=True, ops=("flip",))
    seen = set()
    for seed in range(30):
        out = t(img, [4, 10, 20, 30], "the left cup", random.Random(seed))
        seen.add(out.flipped)
        if out.flipped:
            # Nothing but the mirror: no resize, jitter or shift.
            assert torch.equal(out.image, plain.image.flip(-1))
            assert_close(out.box_xyxy, [44, 10, 60, 30], tol=1e-6)
            assert out.phrase == "the right cup"
        else:
            assert torch.equal(out.image, plain.image) and out.phrase == "the left cup"
            assert_close(out.box_xyxy, [4, 10, 20, 30], tol=1e-6)
    assert seen == {True, False}


def test_spatial_words_skip_the_crop():
    img = _target_image(200, 160, [150, 20, 190, 60])
    t = GroundingTransform(64, augment=True)
    for seed in range(40):
        out = t(img, [150, 20, 190, 60], "the cup on the left", random.Random(seed))
        # Without a crop the whole image is kept: its aspect 200:160 survives the resize.
        w = int((~out.mask).any(0).sum())
        h = int((~out.mask).any(1).sum())
        assert abs(w / h - 200 / 160) < 0.06
    assert has_spatial_word("Top shelf") and has_spatial_word("leftmost cup")
    assert not has_spatial_word("a bright lefty cupboard")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_flip_word_swap_round_trip(text):
    assert swap_left_right(swap_left_right(text)) == text


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "left",
                "right",
                "Left",
                "RIGHT",
                "bright",
                "cat",
                "leftmost",
                "copyright",
                "left-hand",
                "upright",
                ",",
            ]
        ),
        max_size=8,
    )
)
def test_flip_swaps_whole_words_only(words):
    phrase = " ".join(words)
    swapped = swap_left_right(phrase)
    expected = {
        "left": "right",
        "right": "left",
        "Left": "Right",
        "RIGHT": "LEFT",
        "leftmost": "rightmost",
        "left-hand": "right-hand",
    }
    assert swapped == " ".join(expected.get(w, w) for w in words)
    assert "bright" not in phrase or "bright" in swapped


def test_sizes_scale_with_image_size():
    ref = AugmentSizes.for_size(640)
    assert ref.long_sides == (640, 608, 576, 544, 512, 480, 448)
    assert ref.short_sides == (400, 500, 600) and (ref.crop_min, ref.crop_max) == (384, 600)
    tiny = AugmentSizes.for_size(64)
    assert tiny.long_sides[0] == 64 and tiny.long_sides[-1] == 45
    assert tiny.short_sides == (40, 50, 60) and (tiny.crop_min, tiny.crop_max) == (38, 60)
    assert long_side_size(100, 50, 64) == (64, 32) and short_side_size(100, 50, 40) == (80, 40)


@FAST
@given(
    st.integers(8, 200),
    st.integers(8, 200),
    st.lists(st.floats(0, 1), min_size=4, max_size=4),
    st.booleans(),
)
def test_fixed_boxes_match_the_fixed_transform(w, h, frac, flipped):
    # The visual cache computes every row's target box without pixels: it must be the box
    # that the pixel transform gives for the same flip.
    x1, x2 = sorted((frac[0] * w, frac[1] * w))
    y1, y2 = sorted((frac[2] * h, frac[3] * h))
    box = [x1, y1, x2, y2]
    t = GroundingTransform(64, augment=False)
    want = t.fixed(Image.new("RGB", (w, h)), box, "the left one", flipped)
    got = t.fixed_boxes(np.array([[w, h]]), np.array([box]), flipped)[0]
    np.testing.assert_allclose(got, want.box.numpy(), atol=1e-6)
    assert want.flipped == flipped
    assert want.phrase == ("the right one" if flipped else "the left one")


def test_flip_only_training_is_the_fixed_transform_of_its_draw():
    img = _target_image(90, 50, [10, 5, 40, 30])
    fixed = GroundingTransform(64, augment=False)
    train = GroundingTransform(64, augment=True, ops=("flip",))
    for seed in range(12):
        out = train(img, [10, 5, 40, 30], "the left cup", random.Random(seed))
        want = fixed.fixed(img, [10, 5, 40, 30], "the left cup", out.flipped)
        assert torch.equal(out.image, want.image) and torch.equal(out.mask, want.mask)
        assert torch.allclose(out.box, want.box, atol=1e-6) and out.phrase == want.phrase
