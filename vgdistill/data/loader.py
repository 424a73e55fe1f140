"""From a prepared split to batches: decode, transform, tokenize, collate (the batch contract).

Batch keys (B = batch, S = data.image_size, L = data.max_query_len): image [B,3,S,S] uint8
(0 on padding; the model normalises it on its device), image_mask [B,S,S] bool (True on
padding), input_ids / attention_mask [B,L] int64, boxes [B,4] normalised cxcywh in the padded
frame, phrases (after the flip word-swap), orig_boxes [B,4] pixel xyxy in the original image,
scale [B] and pad [B,2] (orig_px = (padded_px - pad) / scale), orig_size [B,2] (width,
height), index [B] (row index in the split).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vgdistill.data.image_table import ImageTable
from vgdistill.data.manifest import load_prepared
from vgdistill.data.transforms import GroundingTransform
from vgdistill.recipe import AUGMENTATIONS

if TYPE_CHECKING:
    import datasets
    from PIL import Image

    from vgdistill.recipe import DataConfig

__all__ = [
    "GroundingDataset",
    "SeededDataset",
    "build_loader",
    "collate",
    "encode_phrase",
    "load_prepared",
    "sample_seed",
]

log = logging.getLogger("vgdistill")
_warned_truncation = False


def _warn_truncated(phrase: str, n_tokens: int, max_len: int) -> None:
    global _warned_truncation
    if not _warned_truncation:
        _warned_truncation = True
        log.warning(
            "phrases longer than data.max_query_len=%d tokens are truncated (first: %r, %d "
            "tokens); raise data.max_query_len to keep them whole (shown once)",
            max_len,
            phrase,
            n_tokens,
        )


def encode_phrase(tokenizer: Any, phrase: str, max_len: int) -> tuple[list[int], list[int]]:
    """[CLS] + word pieces (first max_len - 2) + [SEP], zero-padded: (input_ids, attention_mask)."""
    ids = tokenizer(phrase, add_special_tokens=True, truncation=False)["input_ids"]
    if len(ids) > max_len:
        _warn_truncated(phrase, len(ids), max_len)
        ids = tokenizer(phrase, add_special_tokens=True, truncation=True, max_length=max_len)[
            "input_ids"
        ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(ids)
    return list(ids) + [pad_id] * (max_len - n), [1] * n + [0] * (max_len - n)


class GroundingDataset(Dataset):
    """A prepared split as model inputs; augmentation only when `train and augment`."""

    def __init__(
        self,
        hf_split: datasets.Dataset,
        tokenizer: Any,
        image_size: int,
        max_query_len: int,
        train: bool,
        augment: bool,
        augment_ops: Sequence[str] = AUGMENTATIONS,
        crop: str = "whole",
    ) -> None:
        self.data = hf_split
        self.images = ImageTable.of(hf_split)
        self.tokenizer = tokenizer
        self.max_query_len = int(max_query_len)
        self.train = train
        self.transform = GroundingTransform(
            image_size, augment=train and augment, ops=augment_ops, crop=crop
        )
        # The augmentation never makes the long side larger than S, nor (when it crops) the
        # short side larger than its largest short-side resize.
        self.min_short = max(self.transform.sizes.short_sides) if "crop" in augment_ops else 0
        # Evaluation batches an image's rows together (one visual pass per image), so they
        # reach one worker in a row: decoding the image once serves them all.
        self._last_image: tuple[int, Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def _rng(self) -> random.Random:
        # Drawn from torch's generator, which DataLoader seeds per worker from the loader's
        # seeded generator: augmentations are reproducible for a given seed and worker count.
        return random.Random(int(torch.randint(0, 2**62, ()).item()))

    def _draft(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest decode size that every augmentation still only shrinks, when it is at
        most half the image (JPEG then decodes at 1/2, 1/4 or 1/8 scale); else None. Training
        with augmentation only: evaluation decodes in full, so its boxes map back exactly."""
        if not self.transform.augment:
            return None
        f = max(self.transform.size / max(width, height), self.min_short / min(width, height))
        return (math.ceil(width * f), math.ceil(height * f)) if f <= 0.5 else None

    def _image(self, row: dict[str, Any], name: str, width: int, height: int) -> Image.Image:
        """The row's decoded image; without augmentation the last one is reused for its rows."""
        if self.transform.augment:
            return self.images.load_row(row, name, self._draft(width, height))
        key = int(row["image_index"])
        if self._last_image is None or self._last_image[0] != key:
            self._last_image = (key, self.images.load_row(row, name))
        return self._last_image[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.data[int(index)]
        name = f"{row.get('source', 'dataset')} row {index} (image {row.get('image_id')})"
        width, height = row["width"], row["height"]
        img = self._image(row, name, width, height)
        orig = np.asarray(row["bbox"], dtype=np.float64)
        # A reduced decode: the box follows the pixels, and `scale` still maps to original pixels.
        sx, sy = img.width / width, img.height / height
        rng = self._rng() if self.transform.augment else None
        out = self.transform(img, orig * [sx, sy, sx, sy], row["expression"], rng)
        ids, mask = encode_phrase(self.tokenizer, out.phrase, self.max_query_len)
        return {
            "image": out.image,
            "image_mask": out.mask,
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "attention_mask": torch.tensor(mask, dtype=torch.int64),
            "boxes": out.box,
            "phrases": out.phrase,
            "orig_boxes": torch.tensor(orig, dtype=torch.float32),
            "scale": torch.tensor(out.scale * sx, dtype=torch.float32),
            "pad": torch.tensor(out.pad, dtype=torch.float32),
            "orig_size": torch.tensor([width, height], dtype=torch.int64),
            "index": torch.tensor(int(index), dtype=torch.int64),
        }


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that each sample's random draws depend only on (seed, epoch, row).

    The torch CPU, Python and NumPy global generators are seeded per sample and restored
    afterwards: augmentation becomes independent of worker count, process count and resume
    point, and loading data in the main process never shifts the RNG that dropout uses.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-sample seeds are used."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        s = sample_seed(self.seed, self.epoch, int(index))
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample tensors into the batch dict; phrases stay a list of str."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = values if key == "phrases" else torch.stack(values)
    return batch


def build_loader(
    hf_split: datasets.Dataset,
    tokenizer: Any,
    data_cfg: DataConfig,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int | None = None,
) -> DataLoader:
    """A DataLoader over a prepared split: shuffled by a seeded generator when `train`."""
    dataset = GroundingDataset(
        hf_split,
        tokenizer,
        image_size=data_cfg.image_size,
        max_query_len=data_cfg.max_query_len,
        train=train,
        augment=data_cfg.augment,
        augment_ops=data_cfg.augment_ops,
        crop=data_cfg.crop,
    )
    workers = data_cfg.num_workers if num_workers is None else int(num_workers)
    if workers > 0:
        # Fast tokenizers warn (and may deadlock) when their thread pool is forked.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        generator=generator,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=False,
    )
