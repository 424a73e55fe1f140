"""`shapes`: a deterministic synthetic visual-grounding benchmark generated from a seed.

Why it exists: the embedded demo must train and evaluate a grounding model offline on a CPU in
minutes, and the benchmark must prove that the model *reads the phrase*. So every image holds
several objects that share the target's colour or shape, and only the whole phrase picks the
target.

Scene. A square RGB image (64 px by default) with a low-contrast textured background (a
gradient, stripes, blocky noise or a checkerboard on a pale, slightly tinted grey, plus mild
pixel noise) and 3-5 non-overlapping flat-coloured objects. Each object has one of 4 shapes
(circle, square, triangle, cross), 6 clearly separable colours (red, green, blue, yellow,
purple, pink) and 2 sizes (small: 17-21 % of the image side, large: 31-37 %). Each image draws
its objects from a small pool of 2-3 colours and 2-3 shapes, so objects share attributes and
every target has a distractor of its colour or of its shape; the target itself is picked
uniformly among the objects that can be described, so "which object is the target" carries no
phrase-free signal (the phrase-blind baselines in tests/test_shapes.py stay near 1 / #objects).

Phrases. Built from the scene metadata, never parsed back, and checked unique by
construction with pixel margins so the geometry is unambiguous:
  - attr:      a unique description ("the small red circle", "the triangle").
  - absolute:  a description that several objects share, plus the extreme one in a direction
               ("the red circle on the left", "the top square", "the lower blue cross").
  - direction: a shared description, plus a side of a uniquely described reference object;
               exactly one match lies on that side, the others on the other side or level with
               it ("the small red circle left of the blue square", "the triangle above the
               green circle").
  - nearest:   a shared description, plus "next to"/"near"/"closest to" a reference; the target
               is clearly the closest match ("the square next to the yellow cross").
Sizes are absolute classes (every dataset holds both), "left"/"right" only appear as whole words
so the horizontal-flip word swap stays correct, and phrases stay within 10 words (the tiny
recipe's max_query_len of 12 with [CLS]/[SEP]).
Known shortcuts (they need the phrase, but not the reference): a direction phrase's target is
the extreme match on the named side, since every other match lies level with the reference or
beyond it; and the margins that make a nearest phrase clear push the other matches away from
the reference, often towards the border, so the target is the match nearest the image centre
about 70% of the time (val + testB, seed 13).

Splits. testA holds attribute / absolute-position phrases (attr, absolute), testB relational
phrases (direction, nearest), train and val mix both families half and half. With
train_mix="relational" the train split leans to relations and to "nearest" among them, and
drops most of the nearest phrases whose target is also the match nearest the image centre
(TRAIN_RELATION_SHARE and below), so that shortcut pays less in training; val and the test
splits are the same bytes either way.
Each image carries two expressions with different targets (like RefCOCO's several referring
expressions per image), so a model that ignores the phrase cannot be right on both.

Lessons. A quarter of the train images are two-object "lessons" (attribute phrases only, as a
relation needs three objects); val and the test splits always hold 3-5 objects. Why: a grounding
model trained from scratch first learns to hedge, predicting a box between the objects, because
committing to one object is only worth it once it also reads the phrase; the published TransVG
escapes this by starting from a DETR detector. In a two-object scene committing pays off sooner,
so the lessons shorten that plateau: the demo's tiny student climbs from step ~250 on instead of
idling near 5% Acc@0.5 for over 1,000 steps.

Determinism. Every image is generated from its own numpy Generator seeded with
(seed, split, image index), so the same seed gives the same bytes, splits are independent and
any slice can be generated alone (parallel-safe); PNGs are written with fixed settings.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vgdistill.errors import VGError

DESCRIPTION = (
    "synthetic coloured shapes on textured backgrounds, phrases by colour/shape/size/position/"
    "relation (generated from --seed, no files needed)"
)
DEFAULT_COUNTS: dict[str, int] = {"train": 8000, "val": 500, "testA": 500, "testB": 500}

# Which phrase family each split holds: testA attribute/absolute, testB relational.
SPLIT_FAMILIES: dict[str, str] = {
    "train": "mixed",
    "val": "mixed",
    "testA": "attribute",
    "testB": "relation",
}
ROWS_PER_IMAGE = 2
MAX_WORDS = 10

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 165, 65),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 45),
    "purple": (145, 65, 200),
    "pink": (240, 125, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
OBJECTS_PER_IMAGE = (3, 5)  # inclusive range
LESSON_OBJECTS = 2  # objects in a train "lesson" image
LESSON_SHARE = 0.25  # share of train images that are lessons
# The "relational" train mix. A relation takes three attention hops to resolve (read the
# phrase, find the reference, pick the match closest to it), so this train split holds more
# relational phrases than val (65 % against 50 %), and mostly "nearest" ones (80 % of them first
# try that kind), the kind a student learns last. And a nearest phrase whose target is also its
# group's match nearest the image centre is dropped with TRAIN_DECENTRE probability: otherwise
# "pick the most central match" answers about 70 % of them, and a student settles for that.
TRAIN_MIXES = ("natural", "relational")
TRAIN_RELATION_SHARE = 0.65
TRAIN_NEAREST_FIRST = 0.8
TRAIN_DECENTRE = 0.65
# Object side as a fraction of the image side: two clearly separate classes.
_SIZE_RANGE = {"small": (0.17, 0.21), "large": (0.31, 0.37)}

_COLOUR_NAMES = tuple(COLOURS)
_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
# Descriptions always name the shape; colour and size are optional qualifiers.
_DESCRIPTORS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
)
_ABSOLUTE_TEMPLATES = {
    "left": ("the {d} on the left", "the left {d}"),
    "right": ("the {d} on the right", "the right {d}"),
    "top": ("the {d} at the top", "the top {d}", "the upper {d}"),
    "bottom": ("the {d} at the bottom", "the bottom {d}", "the lower {d}"),
}
# Shortest wording first: it is the fallback when a phrase would exceed MAX_WORDS.
_RELATION_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
    "near": ("near", "next to", "closest to", "beside"),
}
_SPLIT_CODES = {"train": 1, "val": 2, "testA": 3, "testB": 4}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: attributes, tight pixel box (x1, y1, x2, y2) and centre."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    cx: float
    cy: float

    def attr(self, name: str) -> str:
        """The value of attribute `name` ("shape", "colour" or "size")."""
        return getattr(self, name)


def generate_rows(
    seed: int,
    counts: dict[str, int] | None = None,
    image_size: int = 64,
    *,
    with_objects: bool = False,
    train_mix: str = "natural",
) -> Iterator[dict]:
    """Yield grounding rows (image PNG bytes, expression, bbox_xyxy, ids, split) per split.

    `counts` maps split name (train, val, testA, testB) to a number of rows (default
    DEFAULT_COUNTS). With `with_objects`, each row also carries "objects" (every object's
    shape, colour, size and tight box), "target" and "query" (the phrase's structure).
    `train_mix` is the train split's phrase mix: "natural" (as val) or "relational".
    """
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    _check_args(seed, counts, image_size)
    if train_mix not in TRAIN_MIXES:
        raise VGError(
            f"shapes: train_mix must be one of {', '.join(TRAIN_MIXES)}, got {train_mix!r}"
        )
    for split, count in counts.items():
        family = SPLIT_FAMILIES[split]
        if split == "train" and train_mix == "relational":
            family = "relational-train"
        for image_index in range(math.ceil(count / ROWS_PER_IMAGE)):
            n_rows = min(ROWS_PER_IMAGE, count - image_index * ROWS_PER_IMAGE)
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], image_index])
            # Always ROWS_PER_IMAGE queries, so a smaller count yields a prefix of a larger one.
            lesson = split == "train" and rng.random() < LESSON_SHARE
            n_objects = (LESSON_OBJECTS,) * 2 if lesson else OBJECTS_PER_IMAGE
            objects, queries, pixels = _make_image(
                rng, image_size, "attribute" if lesson else family, ROWS_PER_IMAGE, n_objects
            )
            png = _encode_png(pixels)
            image_id = f"shapes-{split}-{image_index:06d}"
            for j, query in enumerate(queries[:n_rows]):
                target = objects[query["target"]]
                row = {
                    "image": png,
                    "expression": query.pop("text"),
                    "bbox_xyxy": [float(v) for v in target.box],
                    "image_id": image_id,
                    "ref_id": f"{image_id}-{j}",
                    "split": split,
                }
                if with_objects:
                    row["objects"] = [
                        {
                            "shape": o.shape,
                            "colour": o.colour,
                            "size": o.size,
                            "bbox_xyxy": [float(v) for v in o.box],
                        }
                        for o in objects
                    ]
                    row["target"] = query["target"]
                    row["query"] = query
                yield row


def _check_args(seed: object, counts: dict, image_size: object) -> None:
    """Refuse arguments the generator cannot honour, with a one-line fix."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise VGError(f"shapes: the seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or not 32 <= image_size <= 1024:
        raise VGError(f"shapes: image_size must be an integer in 32..1024, got {image_size!r}")
    for split, count in counts.items():
        if split not in SPLIT_FAMILIES:
            raise VGError(f"shapes: unknown split {split!r}; use {', '.join(SPLIT_FAMILIES)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise VGError(f"shapes: the count for {split} must be an integer >= 0, got {count!r}")


# ---------------------------------------------------------------------------------------------
# Scene: background, object placement, drawing.


def _make_image(
    rng: np.random.Generator, size: int, family: str, n_rows: int, n_objects: tuple[int, int]
) -> tuple[list[ShapeObject], list[dict], np.ndarray]:
    """Draw scenes of n_objects (an inclusive range) until one admits `n_rows` expressions
    with different targets."""
    while True:
        placed = _place_objects(rng, size, n_objects)
        objects = [_shape_object(*p) for p in placed]
        queries = _make_queries(rng, objects, size, family, n_rows)
        if queries is not None:
            return objects, queries, _render(rng, size, placed)


def _place_objects(rng: np.random.Generator, size: int, n_objects: tuple[int, int]) -> list[tuple]:
    """Pick n_objects (an inclusive range) from a small attribute pool; place them apart."""
    gap = max(2, size // 32)  # keeps tight boxes apart, so no box holds a neighbour's pixels
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        colour_pool = rng.choice(len(_COLOUR_NAMES), size=int(rng.integers(2, 4)), replace=False)
        shape_pool = rng.choice(len(SHAPES), size=int(rng.integers(2, 4)), replace=False)
        specs = []
        for _ in range(n):
            sz = SIZES[int(rng.integers(2))]
            lo, hi = _SIZE_RANGE[sz]
            side = int(round(size * rng.uniform(lo, hi)))
            colour = _COLOUR_NAMES[int(colour_pool[rng.integers(len(colour_pool))])]
            shape = SHAPES[int(shape_pool[rng.integers(len(shape_pool))])]
            specs.append((shape, colour, sz, side))
        # Large objects first: they are the hard ones to fit.
        specs.sort(key=lambda s: -s[3])
        placed: list[tuple] = []
        for shape, colour, sz, side in specs:
            for _ in range(40):
                x0 = int(rng.integers(1, size - side))
                y0 = int(rng.integers(1, size - side))
                if all(
                    x0 >= px + ps + gap
                    or px >= x0 + side + gap
                    or y0 >= py + ps + gap
                    or py >= y0 + side + gap
                    for _, _, _, ps, px, py in placed
                ):
                    placed.append((shape, colour, sz, side, x0, y0))
                    break
            else:
                break
        if len(placed) == n:
            return placed


def _shape_object(shape: str, colour: str, sz: str, side: int, x0: int, y0: int) -> ShapeObject:
    """The object record of a placed shape, with its tight box from the drawn mask."""
    _, (bx0, by0, bx1, by1) = _mask(shape, side)
    box = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
    return ShapeObject(shape, colour, sz, box, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


@lru_cache(maxsize=512)
def _mask(shape: str, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A boolean side x side mask of `shape` and its tight box (x1, y1, x2, y2), exclusive."""
    c = (np.arange(side) + 0.5) - side / 2  # pixel-centre coordinates around the middle
    y, x = np.meshgrid(c, c, indexing="ij")
    half = side / 2
    if shape == "circle":
        mask = x**2 + y**2 <= half**2
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        # Apex up, base on the bottom row; the +1 keeps a visible tip on the first row.
        rows = np.arange(side)[:, None]
        mask = np.abs(x) <= (rows + 1) / side * half
    elif shape == "cross":
        arm = max(3, round(side / 3))
        arm += (side - arm) % 2  # same parity as the side keeps the cross symmetric
        a0 = (side - arm) // 2
        band = (np.arange(side) >= a0) & (np.arange(side) < a0 + arm)
        mask = band[:, None] | band[None, :]
    else:  # pragma: no cover - SHAPES is fixed
        raise ValueError(shape)
    ys, xs = np.nonzero(mask)
    mask.setflags(write=False)
    return mask, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in 0..1, (yy, xx), shared by the background textures."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A pale, low-contrast textured background as float32 (size, size, 3)."""
    yy, xx = _grid(size)
    base = rng.uniform(100, 160) + rng.uniform(-12, 12, size=3)
    kind = int(rng.integers(4))
    theta = rng.uniform(0, 2 * np.pi)
    along = np.cos(theta) * xx + np.sin(theta) * yy
    if kind == 0:  # gradient
        field = rng.uniform(15, 35) * (along - along.mean())
    elif kind == 1:  # stripes
        freq = rng.uniform(3, 9)
        field = rng.uniform(5, 12) * np.sin(2 * np.pi * freq * along + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # blocky noise
        cells = int(rng.choice([4, 8, 16]))
        low = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
        reps = -(-size // cells)
        field = rng.uniform(6, 12) * np.kron(low, np.ones((reps, reps), np.float32))[:size, :size]
    else:  # checkerboard
        cell = int(rng.choice([4, 8, 16])) * size // 64 or 1
        idx = np.arange(size) // cell
        field = rng.uniform(4, 9) * (((idx[:, None] + idx[None, :]) % 2) * 2.0 - 1.0)
    return base.astype(np.float32)[None, None, :] + field.astype(np.float32)[:, :, None]


def _render(rng: np.random.Generator, size: int, placed: list[tuple]) -> np.ndarray:
    """Background, then flat-coloured objects (slight colour jitter), then mild pixel noise."""
    img = _background(rng, size)
    for shape, colour, _, side, x0, y0 in placed:
        mask, _ = _mask(shape, side)
        rgb = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-10, 10, size=3)
        img[y0 : y0 + side, x0 : x0 + side][mask] = rgb
    img += rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes (8-bit RGB, "Up" filter on every row, zlib level 6), written directly.

    Fixed settings make the same pixels give the same bytes, independent of the Pillow
    version; and for these small noisy images this is ~4x faster than Pillow's adaptive filter.
    """
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    up = rows.copy()
    up[1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps modulo 256, as PNG specifies
    raw = np.concatenate([np.full((height, 1), 2, np.uint8), up], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------
# Phrases: enumerate the unambiguous descriptions of a target, pick one, word it.


class _Scene:
    """The objects of one image with their description groups, computed once per scene."""

    def __init__(self, objects: list[ShapeObject], size: int) -> None:
        self.objects, self.size = objects, size
        self.margin = 0.09 * size  # the pixel margin that makes a position or relation clear
        # groups[d][i]: indices of the objects sharing object i's values on descriptor d.
        self.groups: dict[tuple[str, ...], list[list[int]]] = {}
        for d in _DESCRIPTORS:
            keys = [tuple(o.attr(a) for a in d) for o in objects]
            self.groups[d] = [[j for j, k in enumerate(keys) if k == key] for key in keys]
        # unique[i]: the descriptors that single out object i; minimal[i]: the shortest ones.
        self.unique = [
            [d for d in _DESCRIPTORS if self.groups[d][i] == [i]] for i in range(len(objects))
        ]
        self.minimal = [_minimal(u) for u in self.unique]

    def has_distractor(self, i: int) -> bool:
        """Whether another object shares object i's colour or shape."""
        t = self.objects[i]
        return any(
            j != i and (o.colour == t.colour or o.shape == t.shape)
            for j, o in enumerate(self.objects)
        )

    def most_central(self, t: int, query: dict) -> bool:
        """Whether t is, of the objects matching the query's description, the nearest the centre."""
        group = self.groups[tuple(query["desc"])][t]
        half = self.size / 2
        off = {i: math.hypot(self.objects[i].cx - half, self.objects[i].cy - half) for i in group}
        return min(group, key=off.__getitem__) == t

    def candidates(self, t: int, kind: str) -> list[dict]:
        """All unambiguous phrase structures of one kind for target t."""
        if kind == "attr":
            return self._attr(t)
        if kind == "absolute":
            return self._absolute(t)
        return self._relation(t, kind)

    def _attr(self, t: int) -> list[dict]:
        """Unique descriptions of t; over-specified ones kept but rarer (see _pick)."""
        return [
            {"kind": "attr", "desc": list(d), "weight": 3.0 if d in self.minimal[t] else 1.0}
            for d in self.unique[t]
        ]

    def _absolute(self, t: int) -> list[dict]:
        """Shared descriptions where t is the clear extreme in a direction among the matches."""
        objs, out = self.objects, []
        for d in _DESCRIPTORS:
            group = self.groups[d][t]
            if len(group) < 2:
                continue
            keys = {
                "left": {i: objs[i].cx for i in group},
                "right": {i: -objs[i].cx for i in group},
                "top": {i: objs[i].cy for i in group},
                "bottom": {i: -objs[i].cy for i in group},
            }
            for position, values in keys.items():
                if _extreme(values, t, self.margin):
                    out.append({"kind": "absolute", "desc": list(d), "position": position})
        return out

    def _relation(self, t: int, kind: str) -> list[dict]:
        """Shared descriptions of t plus a uniquely described reference that settles which."""
        objs, margin, out = self.objects, self.margin, []
        for d in _DESCRIPTORS:
            group = self.groups[d][t]
            if len(group) < 2:
                continue
            for r, ref in enumerate(objs):
                if r in group or not self.minimal[r]:
                    continue
                if kind == "direction":
                    relations = []
                    for relation in ("left", "right", "above", "below"):
                        # Target clearly on that side (and mostly along that axis, so "below"
                        # never names an object far off to the side); every other match level
                        # with the reference or beyond it.
                        along, across = _side_offset(objs[t], ref, relation)
                        if (
                            along >= margin
                            and across <= 1.2 * along
                            and all(
                                _side_offset(objs[i], ref, relation)[0] <= 0
                                for i in group
                                if i != t
                            )
                        ):
                            relations.append(relation)
                else:
                    dist = {i: math.hypot(objs[i].cx - ref.cx, objs[i].cy - ref.cy) for i in group}
                    gaps = {i: _gap(objs[i], ref) for i in group}
                    # Clearly the closest, centre to centre (an absolute and a relative margin)
                    # and edge to edge, so a large object's size cannot flip the answer.
                    clear = all(
                        dist[t] + margin <= dist[i]
                        and dist[t] * 1.4 <= dist[i]
                        and gaps[t] + 2 <= gaps[i]
                        for i in group
                        if i != t
                    )
                    relations = ["near"] if clear else []
                out.extend(
                    {
                        "kind": kind,
                        "desc": list(d),
                        "relation": relation,
                        "reference": r,
                        "ref_desc": list(rd),
                    }
                    for relation in relations
                    for rd in self.minimal[r]
                )
        return out


def _minimal(descs: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The descriptors none of whose strict subsets are also in `descs`."""
    return [d for d in descs if not any(set(e) < set(d) for e in descs)]


def _extreme(values: dict[int, float], target: int, margin: float) -> bool:
    """Whether `target` has the smallest value by at least `margin` over every other key."""
    return all(values[target] + margin <= v for k, v in values.items() if k != target)


def _gap(a: ShapeObject, b: ShapeObject) -> float:
    """The shortest distance between the boxes of a and b (0 when they touch)."""
    dx = max(0, a.box[0] - b.box[2], b.box[0] - a.box[2])
    dy = max(0, a.box[1] - b.box[3], b.box[1] - a.box[3])
    return math.hypot(dx, dy)


def _side_offset(obj: ShapeObject, ref: ShapeObject, relation: str) -> tuple[float, float]:
    """How far `obj` lies on the `relation` side of `ref` and across it, centre to centre."""
    dx, dy = obj.cx - ref.cx, obj.cy - ref.cy
    if relation == "left":
        return -dx, abs(dy)
    if relation == "right":
        return dx, abs(dy)
    if relation == "above":
        return -dy, abs(dx)
    return dy, abs(dx)  # below


def _kind_order(rng: np.random.Generator, family: str) -> list[str]:
    """The phrase kinds to try, preferred first, for a split's family."""
    direction_first = 0.6
    if family == "relational-train":
        family = "relation" if rng.random() < TRAIN_RELATION_SHARE else "attribute"
        direction_first = 1 - TRAIN_NEAREST_FIRST
    elif family == "mixed":
        family = "attribute" if rng.random() < 0.5 else "relation"
    if family == "attribute":
        return ["attr", "absolute"] if rng.random() < 0.5 else ["absolute", "attr"]
    return ["direction", "nearest"] if rng.random() < direction_first else ["nearest", "direction"]


def _make_queries(
    rng: np.random.Generator, objects: list[ShapeObject], size: int, family: str, n_rows: int
) -> list[dict] | None:
    """`n_rows` phrase structures with different targets, or None if the scene cannot."""
    scene = _Scene(objects, size)
    eligible = [i for i in range(len(objects)) if scene.has_distractor(i)]
    used: set[int] = set()
    queries = []
    for _ in range(n_rows):
        chosen = None
        order = [int(i) for i in rng.permutation(eligible) if int(i) not in used]
        for kind in _kind_order(rng, family):
            for t in order:
                cands = scene.candidates(t, kind)
                if family == "relational-train" and kind == "nearest":
                    cands = [
                        c
                        for c in cands
                        if not (scene.most_central(t, c) and rng.random() < TRAIN_DECENTRE)
                    ]
                if cands:
                    chosen = _pick(rng, cands)
                    chosen["target"] = t
                    break
            if chosen is not None:
                break
        if chosen is None:
            return None
        used.add(chosen["target"])
        chosen["text"] = _word(rng, objects, chosen)
        queries.append(chosen)
    return queries


def _pick(rng: np.random.Generator, cands: list[dict]) -> dict:
    """One candidate, by its weight (default 1)."""
    weights = np.array([c.pop("weight", 1.0) for c in cands], dtype=np.float64)
    return cands[int(rng.choice(len(cands), p=weights / weights.sum()))]


def _describe(rng: np.random.Generator, obj: ShapeObject, desc: list[str]) -> list[str]:
    """Words for `obj` under descriptor `desc`, in the order size, colour, shape."""
    words = []
    if "size" in desc:
        options = _SIZE_WORDS[obj.size]
        words.append(options[int(rng.integers(len(options)))])
    if "colour" in desc:
        words.append(obj.colour)
    words.append(obj.shape)
    return words


def _word(rng: np.random.Generator, objects: list[ShapeObject], q: dict) -> str:
    """The phrase text of a query structure, at most MAX_WORDS words."""
    d = " ".join(_describe(rng, objects[q["target"]], q["desc"]))
    if q["kind"] == "attr":
        return f"the {d}"
    if q["kind"] == "absolute":
        options = _ABSOLUTE_TEMPLATES[q["position"]]
        return options[int(rng.integers(len(options)))].format(d=d)
    r = " ".join(_describe(rng, objects[q["reference"]], q["ref_desc"]))
    options = _RELATION_WORDS[q["relation"]]
    text = f"the {d} {options[int(rng.integers(len(options)))]} the {r}"
    if len(text.split()) > MAX_WORDS:
        text = f"the {d} {options[0]} the {r}"
    return text
