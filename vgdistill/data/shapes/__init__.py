"""`shapes`: a deterministic synthetic visual-grounding benchmark generated from a seed.

Why it exists: the embedded demo must train and evaluate a grounding model offline on a CPU in
minutes, and the benchmark must prove that the model *reads the phrase*. So every image holds
several objects that share the target's colour or shape, and only the whole phrase picks the
target. The modules: `spec` (vocabulary and parameters), `scene` (objects and their placement),
`render` (pixels and PNG bytes), `phrases` (the unambiguous queries and their wording).

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
so the lessons shorten that plateau.

Determinism. Every image is generated from its own numpy Generator seeded with
(seed, split, image index), so the same seed gives the same bytes, splits are independent and
any slice can be generated alone (parallel-safe); PNGs are written with fixed settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from vgdistill.data.shapes.phrases import make_queries
from vgdistill.data.shapes.render import encode_png, render
from vgdistill.data.shapes.scene import place_objects, shape_object
from vgdistill.data.shapes.spec import (
    COLOURS,
    DEFAULT_COUNTS,
    LESSON_OBJECTS,
    LESSON_SHARE,
    MAX_WORDS,
    OBJECTS_PER_IMAGE,
    ROWS_PER_IMAGE,
    SHAPES,
    SIZES,
    SPLIT_FAMILIES,
    TRAIN_MIXES,
    ShapeObject,
)
from vgdistill.errors import VGError

__all__ = [
    "COLOURS",
    "DEFAULT_COUNTS",
    "DESCRIPTION",
    "MAX_WORDS",
    "OBJECTS_PER_IMAGE",
    "ROWS_PER_IMAGE",
    "SHAPES",
    "SIZES",
    "SPLIT_FAMILIES",
    "TRAIN_MIXES",
    "ShapeObject",
    "generate_rows",
]

DESCRIPTION = (
    "synthetic coloured shapes on textured backgrounds, phrases by colour/shape/size/position/"
    "relation (generated from --seed, no files needed)"
)
_SPLIT_CODES = {"train": 1, "val": 2, "testA": 3, "testB": 4}


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
            png = encode_png(pixels)
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


def _make_image(
    rng: np.random.Generator, size: int, family: str, n_rows: int, n_objects: tuple[int, int]
) -> tuple[list[ShapeObject], list[dict], np.ndarray]:
    """Draw scenes of n_objects (an inclusive range) until one admits `n_rows` expressions
    with different targets."""
    while True:
        placed = place_objects(rng, size, n_objects)
        objects = [shape_object(*p) for p in placed]
        queries = make_queries(rng, objects, size, family, n_rows)
        if queries is not None:
            return objects, queries, render(rng, size, placed)
