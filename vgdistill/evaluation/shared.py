"""One visual pass per image: rows batched by image, an image's visual tokens shared by its rows.

The visual branch (backbone + DETR encoder) is most of the model's cost and depends only on the
image, while RefCOCO's test splits hold about seven phrases per image. Evaluation therefore
batches the rows of an image together and runs the visual branch once per distinct image of a
batch; BERT, the fusion and the box head still run per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vgdistill.data.images import ImageIndex


def first_occurrence(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(distinct keys, position of each one's first occurrence, each row's distinct-key index)."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((unique.numel(),), keys.numel(), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return unique, first, inverse


def image_batches(
    image_ids: Sequence[Any] | None, n_rows: int, batch_size: int
) -> tuple[list[list[int]], Tensor]:
    """Rows packed into batches of at most `batch_size`, an image's rows kept together (an
    image with more rows spans several batches), and the image number of every row [n_rows].

    Without image ids every row counts as its own image.
    """
    index = ImageIndex.from_ids(list(image_ids) if image_ids is not None else range(n_rows))
    batches: list[list[int]] = []
    current: list[int] = []
    for rows in index.rows_of():
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            if len(current) + len(part) > batch_size:
                batches.append(current)
                current = []
            current.extend(part)
    if current:
        batches.append(current)
    return batches, torch.tensor(index.image_of_row, dtype=torch.long)


def shared_visual(
    visual: nn.Module, image: Tensor, image_mask: Tensor, keys: Tensor
) -> tuple[Tensor, Tensor]:
    """`visual` run once per distinct key (image) of the batch, expanded back to every row:
    the (tokens [B,N,D], padding mask [B,N]) that `EpmVG.forward(..., visual=...)` takes."""
    _, first, inverse = first_occurrence(keys.to(image.device))
    tokens, pad, _ = visual(image[first], image_mask[first].bool())
    return tokens[inverse], pad[inverse]
