"""Decode-once caches: a stage that revisits each distinct image keeps it decoded in memory.

The teacher's frames and the detector's images both decode every distinct image once, in
worker processes, and keep the pixels (uint8 as they are, floats as float16), under one byte
limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch

# Above this many bytes of decoded pixels (float16), decode per batch in worker processes
# instead of holding every distinct image in memory.
CACHE_LIMIT_BYTES = 1 << 30


def fits_in_cache(n_items: int, image_shape: Sequence[int]) -> bool:
    """Whether `n_items` float16 images of `image_shape` fit in CACHE_LIMIT_BYTES."""
    return n_items * math.prod(image_shape) * 2 <= CACHE_LIMIT_BYTES


def decode_once(
    dataset: Any, image_shape: Sequence[int], num_workers: int, batch_size: int = 64
) -> list[torch.Tensor] | None:
    """Every item of `dataset` decoded once (in worker processes), each field stacked over the
    items in order, the first field (the pixels, `image_shape` each) uint8 or float16.

    Items are tensors or tuples of tensors. None when the pixels do not fit in
    CACHE_LIMIT_BYTES or there is nothing to decode: the caller then decodes per item.
    """
    import torch
    from torch.utils.data import DataLoader

    if len(dataset) == 0 or not fits_in_cache(len(dataset), image_shape):
        return None
    fields: list[list[torch.Tensor]] = []
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        parts = [batch] if isinstance(batch, torch.Tensor) else list(batch)
        if parts[0].is_floating_point():
            parts[0] = parts[0].half()  # per batch: float32 pixels are never all held at once
        fields = fields or [[] for _ in parts]
        for chunks, part in zip(fields, parts, strict=True):
            chunks.append(part)
    return [torch.cat(chunks) for chunks in fields]
