"""Pixels of a `shapes` scene and their PNG bytes.

A low-contrast textured background (a gradient, stripes, blocky noise or a checkerboard on a
pale, slightly tinted grey), flat-coloured objects with a slight colour jitter, then mild pixel
noise. PNGs are written directly with fixed settings, so the same pixels give the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache

import numpy as np

from vgdistill.data.shapes.scene import shape_mask
from vgdistill.data.shapes.spec import COLOURS


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


def render(rng: np.random.Generator, size: int, placed: list[tuple]) -> np.ndarray:
    """Background, then flat-coloured objects (slight colour jitter), then mild pixel noise."""
    img = _background(rng, size)
    for shape, colour, _, side, x0, y0 in placed:
        mask, _ = shape_mask(shape, side)
        rgb = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-10, 10, size=3)
        img[y0 : y0 + side, x0 : x0 + side][mask] = rgb
    img += rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes (8-bit RGB, "Up" filter on every row, zlib level 6), written directly.

    Fixed settings make the same pixels give the same bytes, independent of the Pillow
    version; and for these small noisy images one fixed filter is cheaper than Pillow's
    adaptive one.
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
