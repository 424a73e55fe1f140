"""(image, phrase) pairs of a prepared split, for fitting and scoring the CLIP teacher.

EpmVG feeds the teacher the whole image and the phrase. A grounding dataset has several
phrases per image ("the red circle", "the blue square left of it"), and a whole-image
embedding cannot tell which of them a row is about, so CLIP's in-batch softmax would punish
the model for a true match whenever two phrases of one image share a batch. Batches are
therefore built with at most one phrase per image (and no phrase text twice, so two images
described by the same words are never each other's negative). An epoch still visits every
(image, phrase) row once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vgdistill.data.images import ImageIndex

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch

    from vgdistill.recipe import Recipe


def normalise_phrase(text: str) -> str:
    """The key under which two phrases count as the same text (case and spacing ignored)."""
    return " ".join(text.lower().split())


@dataclass
class PairTable:
    """The rows of one split as (image index, phrase) pairs over its distinct images."""

    image_of_row: list[int]  # row -> index into `first_row`
    phrases: list[str]  # row -> phrase as written
    first_row: list[int]  # image index -> a row that holds the image

    @classmethod
    def from_split(cls, ds: Any) -> PairTable:
        """Group a split's rows by image_id."""
        index = ImageIndex.from_ids(list(ds["image_id"]))
        return cls(index.image_of_row, [str(p) for p in ds["expression"]], index.first_row)

    def positives(self) -> tuple[list[str], list[set[int]]]:
        """Distinct phrase texts, and for each image the set of text indices it carries."""
        texts: dict[str, int] = {}
        pos: list[set[int]] = [set() for _ in self.first_row]
        for img, phrase in zip(self.image_of_row, self.phrases, strict=True):
            key = normalise_phrase(phrase)
            pos[img].add(texts.setdefault(key, len(texts)))
        return list(texts), pos


def distinct_batches(
    image_of_row: Sequence[int],
    phrases: Sequence[str],
    batch_size: int,
    rng: random.Random,
    window: int = 32,
) -> list[list[int]]:
    """Shuffle rows into batches with no image and no phrase text twice in one batch.

    First fit over a small window of open batches: each row joins the first open batch it
    does not clash with; a batch leaves when full (or when too many are open). Every row is
    used once; only a leftover batch of one row (no negative to contrast with) is dropped.
    """
    order = list(range(len(image_of_row)))
    rng.shuffle(order)
    done: list[list[int]] = []
    open_: list[tuple[list[int], set[int], set[str]]] = []
    for row in order:
        img, text = image_of_row[row], normalise_phrase(phrases[row])
        for k, (rows, imgs, texts) in enumerate(open_):
            if img not in imgs and text not in texts:
                rows.append(row)
                imgs.add(img)
                texts.add(text)
                if len(rows) == batch_size:
                    done.append(open_.pop(k)[0])
                break
        else:
            open_.append(([row], {img}, {text}))
            if len(open_) > window:
                done.append(open_.pop(0)[0])
    done.extend(rows for rows, _, _ in open_)
    return [b for b in done if len(b) >= 2]


class Frames:
    """A split's rows as the student sees them: (ImageNet-normalised padded image [3,S,S], phrase).

    The same decoder and transform as training (vgdistill.data), so the teacher is fitted on
    exactly the frames it will be shown at distillation time; with `augment`, TransVG's
    augmentation (a flip swaps left/right in the phrase too). When an image can only take fixed
    forms (no augmentation, or flips only), its forms can be decoded once and kept in memory
    (`load_cache`), so epochs after the first touch no PNG.
    """

    def __init__(
        self,
        ds: Any,
        table: PairTable,
        image_size: int,
        augment: bool,
        augment_ops: Sequence[str],
    ):
        from vgdistill.data.image_table import ImageTable
        from vgdistill.data.transforms import GroundingTransform

        self.images = ImageTable.of(ds)
        cols = [c for c in ("image_index", "image_id", "source") if c in ds.column_names]
        self.ds = ds.select_columns(cols)
        self.table = table
        self.size = int(image_size)
        self.transform = GroundingTransform(self.size, augment=augment, ops=augment_ops)
        self.flips = self.transform.fixed_flips()
        self.cache: torch.Tensor | None = None  # [images, flips, 3, S, S] float16

    def __len__(self) -> int:
        return len(self.table.phrases)

    def _frame(self, row: int, phrase: str) -> tuple[torch.Tensor, str]:
        from vgdistill.models.visual import normalize_pixels

        rec = self.ds[int(row)]
        name = f"{rec.get('source', 'dataset')} row {row} (image {rec.get('image_id')})"
        seed = int(_torch_seed()) if self.transform.augment else 0
        out = self.transform(self.images.load_row(rec, name), None, phrase, random.Random(seed))
        # Normalised here (the padding then reads as 0, as the student's branch sees it), so
        # the fitted teacher and retrieval take these frames without their masks.
        return normalize_pixels(out.image, out.mask), out.phrase

    def __getitem__(self, row: int) -> tuple[torch.Tensor, str]:
        """Row `row` as (image float32 [3,S,S], phrase after any flip word-swap)."""
        phrase = self.table.phrases[row]
        if self.cache is not None:
            from vgdistill.data.spatial_words import swap_left_right
            from vgdistill.data.transforms import FLIP_PROB

            flipped = len(self.cache[0]) > 1 and random.Random(_torch_seed()).random() < FLIP_PROB
            if flipped:
                phrase = swap_left_right(phrase)
            return self.cache[self.table.image_of_row[row], int(flipped)].float(), phrase
        return self._frame(row, phrase)

    def image(self, k: int) -> torch.Tensor:
        """Distinct image `k` (un-augmented), float32 [3,S,S]."""
        if self.cache is not None:
            return self.cache[k, 0].float()
        return self._frame(self.table.first_row[k], "")[0]

    def forms(self, k: int) -> torch.Tensor:
        """Distinct image `k` under each of `self.flips`, float32 [flips,3,S,S]."""
        import torch

        from vgdistill.models.visual import normalize_pixels

        rec = self.ds[int(self.table.first_row[k])]
        name = f"{rec.get('source', 'dataset')} image {rec.get('image_id')}"
        img = self.images.load_row(rec, name)
        box = [0.0, 0.0, img.width, img.height]
        forms = [self.transform.fixed(img, box, "", f) for f in self.flips or ()]
        return torch.stack([normalize_pixels(out.image, out.mask) for out in forms])

    def load_cache(self, num_workers: int) -> None:
        """Decode every distinct image once (in worker processes) and keep its forms in memory,
        when they are fixed (no augmentation, or flips only) and fit the decode-once limit."""
        from vgdistill.data.decoded import decode_once

        if self.flips is None:
            return
        shape = (len(self.flips), 3, self.size, self.size)
        decoded = decode_once(DistinctImages(self, forms=True), shape, num_workers)
        self.cache = None if decoded is None else decoded[0]


def _torch_seed() -> int:
    """A seed drawn from torch's generator (DataLoader seeds it per worker from its own)."""
    import torch

    return int(torch.randint(0, 2**62, ()).item())


class DistinctImages:
    """Map-style dataset over a split's distinct images (for caching and scoring): item k is
    `frames.image(k)`, or with `forms` every cached flip of it, `frames.forms(k)`."""

    def __init__(self, frames: Frames, forms: bool = False):
        self.frames, self.forms = frames, forms

    def __len__(self) -> int:
        return len(self.frames.table.first_row)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.frames.forms(k) if self.forms else self.frames.image(k)


def collate_pairs(samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """Stack a batch of (image, phrase) pairs into (images [B,3,S,S], phrases)."""
    import torch

    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


@dataclass
class SplitPairs:
    """One split ready for fitting or scoring: rows, frames, distinct texts and positives."""

    table: PairTable
    frames: Frames
    texts: list[str]
    positives: list[set[int]]


def load_split_pairs(recipe: Recipe, split: str, augment: bool = False) -> SplitPairs:
    """Read `split` of recipe.data.path as the student's frames (data.image_size), every
    distinct image decoded once and kept when it can be (`Frames.load_cache`)."""
    from vgdistill.data.prepare import load_split

    ds = load_split(recipe.data.path, split)
    table = PairTable.from_split(ds)
    frames = Frames(ds, table, recipe.data.image_size, augment, recipe.data.augment_ops)
    frames.load_cache(recipe.data.num_workers)
    texts, positives = table.positives()
    return SplitPairs(table, frames, texts, positives)
