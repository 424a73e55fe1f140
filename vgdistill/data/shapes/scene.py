"""A `shapes` scene: which objects an image holds and where, with their exact masks and boxes.

Each object has one of 4 shapes (circle, square, triangle, cross), 6 clearly separable colours
(red, green, blue, yellow, purple, pink) and 2 sizes (small: 17-21 % of the image side, large:
31-37 %); an image holds 3-5 of them (2 in a train "lesson"), never overlapping. Each image
draws its objects from a small pool of 2-3 colours and 2-3 shapes, so objects share attributes
and every target has a distractor of its colour or of its shape.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from vgdistill.data.shapes.spec import COLOUR_NAMES, SHAPES, SIZE_RANGE, SIZES, ShapeObject


def place_objects(rng: np.random.Generator, size: int, n_objects: tuple[int, int]) -> list[tuple]:
    """Pick n_objects (an inclusive range) from a small attribute pool; place them apart."""
    gap = max(2, size // 32)  # keeps tight boxes apart, so no box holds a neighbour's pixels
    while True:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        colour_pool = rng.choice(len(COLOUR_NAMES), size=int(rng.integers(2, 4)), replace=False)
        shape_pool = rng.choice(len(SHAPES), size=int(rng.integers(2, 4)), replace=False)
        specs = []
        for _ in range(n):
            sz = SIZES[int(rng.integers(2))]
            lo, hi = SIZE_RANGE[sz]
            side = int(round(size * rng.uniform(lo, hi)))
            colour = COLOUR_NAMES[int(colour_pool[rng.integers(len(colour_pool))])]
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


def shape_object(shape: str, colour: str, sz: str, side: int, x0: int, y0: int) -> ShapeObject:
    """The object record of a placed shape, with its tight box from the drawn mask."""
    _, (bx0, by0, bx1, by1) = shape_mask(shape, side)
    box = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
    return ShapeObject(shape, colour, sz, box, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


@lru_cache(maxsize=512)
def shape_mask(shape: str, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
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
