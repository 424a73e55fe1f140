"""The `shapes` benchmark's vocabulary and parameters: colours, shapes, sizes, split mixes."""

from __future__ import annotations

from dataclasses import dataclass

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
COLOUR_NAMES = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Object side as a fraction of the image side: two clearly separate classes.
SIZE_RANGE = {"small": (0.17, 0.21), "large": (0.31, 0.37)}
OBJECTS_PER_IMAGE = (3, 5)  # inclusive range
LESSON_OBJECTS = 2  # objects in a train "lesson" image
LESSON_SHARE = 0.25  # share of train images that are lessons
# The "relational" train mix. A relation takes three attention hops to resolve (read the
# phrase, find the reference, pick the match closest to it), so this train split holds more
# relational phrases than val (TRAIN_RELATION_SHARE), and mostly "nearest" ones
# (TRAIN_NEAREST_FIRST try that kind first), the kind a student learns last. And a nearest
# phrase whose target is also its group's match nearest the image centre is dropped with
# TRAIN_DECENTRE probability: otherwise "pick the most central match" answers many of them,
# and a student settles for that.
TRAIN_MIXES = ("natural", "relational")
TRAIN_RELATION_SHARE = 0.65
TRAIN_NEAREST_FIRST = 0.8
TRAIN_DECENTRE = 0.65


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
