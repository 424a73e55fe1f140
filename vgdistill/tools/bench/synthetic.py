"""Synthetic inputs for bench: RefCOCO-like phrases, training batches and a prepared split."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vgdistill.recipe import Recipe

# Words for synthetic RefCOCO-like phrases (1-8 words, some with left/right for the flip).
_ADJ = ("red", "blue", "small", "large", "white", "black", "striped", "wooden", "old", "tall")
_NOUN = ("man", "woman", "dog", "car", "chair", "umbrella", "bowl", "giraffe", "bus", "kid")
_WHERE = ("on the left", "on the right", "in the middle", "near the table", "at the back", "")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars from datasets and no 'no pretrained weights' warning from open_clip:
    bench builds everything from random weights on purpose."""
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        if bars:
            datasets.enable_progress_bars()


def synthetic_phrases(n: int, seed: int) -> list[str]:
    """`n` distinct RefCOCO-like phrases (some with left/right, so the flip swaps words)."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        words = [_NOUN[rng.integers(len(_NOUN))]]
        for _ in range(rng.integers(0, 3)):
            words.insert(0, _ADJ[rng.integers(len(_ADJ))])
        where = _WHERE[rng.integers(len(_WHERE))]
        phrase = " ".join([*words, where]).strip()
        if phrase in out:
            phrase = f"{phrase} number {len(out)}"
        out[phrase] = None
    return list(out)


def synthetic_batches(
    recipe: Recipe, tokenizer: Any, batch_size: int, n: int, seed: int, pin: bool
) -> list[dict[str, Any]]:
    """`n` training batches of the recipe's shapes (the loader's batch contract), on the CPU.

    Images are uint8 noise padded like a 4:3 photo (bottom rows are padding: 0, and marked in
    the mask), as the loader hands them over for the model to normalise; phrases are
    tokenized by the real tokenizer and padded to max_query_len, boxes are valid normalised
    cxcywh.
    """
    from vgdistill.data.loader import encode_phrase

    s, length = recipe.data.image_size, recipe.data.max_query_len
    g = torch.Generator().manual_seed(seed)
    pool = synthetic_phrases(max(64, batch_size), seed)
    batches = []
    for i in range(n):
        image = torch.randint(0, 256, (batch_size, 3, s, s), generator=g, dtype=torch.uint8)
        mask = torch.zeros(batch_size, s, s, dtype=torch.bool)
        valid_h = torch.randint(s // 2, s + 1, (batch_size,), generator=g)
        for j, h in enumerate(valid_h.tolist()):
            mask[j, h:] = True
        image = image.masked_fill(mask[:, None], 0)
        phrases = [pool[(i * batch_size + j) % len(pool)] for j in range(batch_size)]
        encoded = [encode_phrase(tokenizer, p, length) for p in phrases]
        centre = 0.3 + 0.4 * torch.rand(batch_size, 2, generator=g)
        size = 0.1 + 0.3 * torch.rand(batch_size, 2, generator=g)
        batch = {
            "image": image,
            "image_mask": mask,
            "input_ids": torch.tensor([e[0] for e in encoded], dtype=torch.int64),
            "attention_mask": torch.tensor([e[1] for e in encoded], dtype=torch.int64),
            "boxes": torch.cat([centre, size], dim=1),
        }
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batch["phrases"] = phrases
        batches.append(batch)
    return batches


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch on `device` (non-blocking from pinned memory), other values as is."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
    }


def _jpeg(rng: np.random.Generator, width: int, height: int, noise: float = 6.0) -> bytes:
    """A photo-like JPEG: smooth colour fields plus sensor-like noise (compresses like a photo;
    more `noise`, more bytes)."""
    from PIL import Image

    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, noise, (height, width, 3)).astype(np.int16)
    pixels = np.asarray(img, dtype=np.int16) + grain
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def synthetic_prepared_split(folder: Path, rows: int, image_size: int, seed: int) -> Any:
    """A prepared split of `rows` rows (JPEG photos at a COCO-like 4:3 size scaled to
    image_size, up to 256 distinct images), prepared into `folder` and memory-mapped back."""
    from vgdistill.data.prepare import load_split, prepare
    from vgdistill.data.sources import RawRow, Source, SourceArgs

    rng = np.random.default_rng(seed)
    width, height = image_size, max(8, round(image_size * 3 / 4))
    n_images = min(rows, 256)
    images = [_jpeg(rng, width, height) for _ in range(n_images)]
    phrases = synthetic_phrases(max(64, rows // 3), seed)
    boxes = []
    for _ in range(rows):
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([x, y, x + w, y + h])
    image_ids = [f"bench-{i % n_images}" for i in range(rows)]
    table = [
        RawRow(
            images[i % n_images],
            phrases[i % len(phrases)],
            tuple(box),
            image_ids[i],
            f"bench-{i}",
            "train",
        )
        for i, box in enumerate(boxes)
    ]
    source = Source("bench", "generated rows", (), lambda args: [], lambda args: iter(table))
    prepare(source, SourceArgs(), folder, force=True, progress=False)
    return load_split(folder, "train")
