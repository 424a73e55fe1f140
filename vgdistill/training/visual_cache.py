"""The frozen visual branch's tokens, computed once per training image instead of every step.

With lr_backbone = lr_encoder = 0 the backbone and DETR encoder are a fixed function (the
student keeps them in eval mode), and when augmentation is off or only flips, an image enters
training in one of two fixed forms (`GroundingTransform.fixed`). Their tokens, and the frozen
teacher's image embeddings, are then the same at every visit: training computes them for every
(image, flip) up front and each step runs only BERT, the fusion and the head on cached tokens.
A step then needs no image decoding, no CNN and no teacher image tower.

Under N processes each process encodes every N-th image and the processes exchange their
shares, so each then holds the whole cache (a step may draw any row) for 1/N of the work.
`train.visual_cache_gb` bounds its size, and a run whose cache would not fit trains from pixels
as before.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from vgdistill.data.image_table import ImageTable
from vgdistill.data.images import ImageIndex
from vgdistill.data.loader import encode_phrase, sample_seed
from vgdistill.data.spatial_words import swap_left_right
from vgdistill.data.transforms import FLIP_PROB, GroundingTransform

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vgdistill.data.loader import GroundingDataset
    from vgdistill.recipe import Recipe

log = logging.getLogger("vgdistill")

GB = 1024**3


def cache_blocker(recipe: Recipe) -> str | None:
    """Why this recipe's training cannot use cached visual tokens; None when it can."""
    t, d = recipe.train, recipe.data
    if t.visual_cache_gb <= 0:
        return "train.visual_cache_gb is 0"
    if t.lr_backbone > 0 or t.lr_encoder > 0:
        return "the visual branch is trained (train.lr_backbone or train.lr_encoder > 0)"
    random_ops = sorted(set(d.augment_ops) - {"flip"}) if d.augment else []
    if random_ops:
        return f"data.augment_ops {random_ops} change the pixels at random"
    if recipe.distill.teacher_trainable and recipe.distill.modality in ("both", "image"):
        return "the teacher is trained (distill.teacher_trainable)"
    if recipe.distill.position == "cnn" and recipe.distill.modality in ("both", "image"):
        return "image distillation at distill.position = cnn reads the CNN map, not the tokens"
    return None


@dataclass
class VisualCache:
    """Per (image, flip): visual tokens, their padding mask and the teacher's image embedding."""

    tokens: Tensor  # [images, flips, N, D] float32
    pad: Tensor  # [images, flips, N] bool
    teacher: Tensor | None  # [images, flips, E] float32; None without image distillation


class CachedRows(torch.utils.data.Dataset):
    """Training rows served from a VisualCache: whole batches, no pixels, no global RNG.

    Each sample's flip is drawn from its own (seed, epoch, row) seed, like the pixel path's
    `SeededDataset`, so batches do not depend on worker count or resume point.
    """

    def __init__(
        self,
        cache: VisualCache,
        image_of_row: Tensor,
        boxes: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        phrases: list[tuple[str, ...]],
        seed: int,
    ) -> None:
        self.cache = cache
        self.image_of_row = image_of_row
        self.boxes, self.input_ids, self.attention_mask = boxes, input_ids, attention_mask
        self.phrases = phrases
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-sample seeds draw the flips."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_of_row)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def flipped(self, index: int) -> bool:
        """Whether row `index` is served mirrored in the current epoch."""
        if self.cache.tokens.shape[1] == 1:
            return False
        return random.Random(sample_seed(self.seed, self.epoch, index)).random() < FLIP_PROB

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """The batch of these rows (DataLoader calls this with a batch's indices)."""
        rows = torch.as_tensor(indices, dtype=torch.int64)
        flips = torch.tensor([self.flipped(int(i)) for i in indices], dtype=torch.int64)
        images = self.image_of_row[rows]
        batch = {
            "visual_tokens": self.cache.tokens[images, flips],
            "visual_pad": self.cache.pad[images, flips],
            "input_ids": self.input_ids[rows, flips],
            "attention_mask": self.attention_mask[rows, flips],
            "boxes": self.boxes[rows, flips],
            "phrases": [self.phrases[int(r)][int(f)] for r, f in zip(rows, flips, strict=True)],
            "index": rows,
        }
        if self.cache.teacher is not None:
            batch["teacher_image"] = self.cache.teacher[images, flips]
        return batch


def whole_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader collate_fn for CachedRows, whose __getitems__ already returns a batch."""
    return batch


def estimate_bytes(n_images: int, n_flips: int, n_tokens: int, dim: int, embed: int) -> int:
    """Memory of a VisualCache: float32 tokens and teacher embeddings, bool padding."""
    return n_images * n_flips * (n_tokens * (dim * 4 + 1) + embed * 4)


@torch.inference_mode()
def _encode(
    student: Any, teacher: Any, images: list[Tensor], masks: list[Tensor], device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    image, mask = torch.stack(images).to(device), torch.stack(masks).to(device)
    tokens, pad, _ = student.visual(image, mask)
    emb = None
    if teacher is not None:
        emb, _ = teacher.encode(image, None, image_mask=mask, want_image=True, want_text=False)
    return tokens.float().cpu(), pad.cpu(), None if emb is None else emb.float().cpu()


def _exchange(acc: Accelerator, own: Tensor, total: int, chunk: int) -> Tensor:
    """Every process's share (process r holds items r, r+N, r+2N, ...) -> all `total` items in
    order, on the CPU of every process. Gathered `chunk` items at a time to bound device memory."""
    from accelerate.utils import gather

    world = acc.num_processes
    if world == 1:
        return own
    if own.dtype == torch.bool:  # gloo gathers no bool tensors
        return _exchange(acc, own.to(torch.uint8), total, chunk).bool()
    per = -(-total // world)  # shares differ by at most one item: pad them to one length
    padded = torch.zeros((per, *own.shape[1:]), dtype=own.dtype)
    padded[: len(own)] = own
    parts = []
    for start in range(0, per, chunk):
        piece = padded[start : start + chunk].to(acc.device)
        parts.append(gather(piece).cpu().view(world, len(piece), *own.shape[1:]))
    # [world, per, ...] -> item j*world + r is process r's j-th
    return torch.cat(parts, dim=1).transpose(0, 1).reshape(world * per, *own.shape[1:])[:total]


def build_cached_rows(
    recipe: Recipe,
    dataset: GroundingDataset,
    student: Any,
    teacher: Any | None,
    acc: Accelerator,
    *,
    show_progress: bool,
) -> CachedRows | None:
    """Encode every (image, flip) of `dataset` once; None (logged) when the cache would not fit.

    `teacher` is the frozen teacher whose image embeddings the loss uses (None without image
    distillation). The student's visual branch runs in eval mode, as it does when frozen. Each
    of the `acc` processes encodes its share of the images; all end with the whole cache.
    """
    started = time.perf_counter()
    transform = GroundingTransform(
        recipe.data.image_size, recipe.data.augment, recipe.data.augment_ops
    )
    flips = transform.fixed_flips()
    assert flips is not None, "cache_blocker refuses random augmentation"
    index = ImageIndex.from_ids(dataset.data["image_id"])
    n_images, n_tokens, dim = len(index), student.feature_side**2, student.visual.dim
    embed = teacher.embed_dim if teacher is not None else 0
    need = estimate_bytes(n_images, len(flips), n_tokens, dim, embed)
    if need > recipe.train.visual_cache_gb * GB:
        log.info(
            "visual tokens not cached: %d images would take %.1f GB > train.visual_cache_gb = %g",
            n_images,
            need / GB,
            recipe.train.visual_cache_gb,
        )
        return None

    mine = range(acc.process_index, n_images, acc.num_processes)
    chunk = recipe.eval.batch_size
    was_training = student.training
    student.eval()
    parts, own_sizes = _encode_share(
        student, teacher, dataset.data, index, mine, transform, chunk, acc.device, show_progress
    )
    student.train(was_training)

    def whole(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        # A process with no image of its own still takes part in every exchange.
        own = torch.cat(parts[name]) if parts[name] else torch.empty((0, *shape), dtype=dtype)
        return _exchange(acc, own, n_images, chunk)

    cache = VisualCache(
        tokens=whole("tokens", (len(flips), n_tokens, dim), torch.float32),
        pad=whole("pad", (len(flips), n_tokens), torch.bool),
        teacher=None if teacher is None else whole("teacher", (len(flips), embed), torch.float32),
    )
    image_of_row = torch.tensor(index.image_of_row, dtype=torch.int64)
    sizes = _exchange(acc, own_sizes, n_images, chunk)[image_of_row].numpy().astype(np.float64)
    boxes, phrases, input_ids, masks = _row_tensors(dataset, transform, sizes)
    log.info(
        "cached the frozen visual branch for %d images x %d flips (%.0f MB) in %.0f s%s",
        n_images,
        len(flips),
        need / 1024**2,
        time.perf_counter() - started,
        f"; {len(mine)} of the images encoded by process {acc.process_index}"
        if acc.num_processes > 1
        else "",
    )
    return CachedRows(cache, image_of_row, boxes, input_ids, masks, phrases, recipe.train.seed)


def _encode_share(
    student: Any,
    teacher: Any | None,
    data: Any,
    index: ImageIndex,
    mine: range,
    transform: GroundingTransform,
    chunk: int,
    device: torch.device,
    show_progress: bool,
) -> tuple[dict[str, list[Tensor]], Tensor]:
    """This process's images `mine`, each in every fixed form, through the frozen branch:
    ({"tokens", "pad", "teacher"}: lists of [n, flips, ...] chunks, sizes [len(mine), 2])."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    flips = transform.fixed_flips() or ()
    images = ImageTable.of(data)
    own_sizes = torch.empty((len(mine), 2), dtype=torch.int64)  # (width, height)
    parts: dict[str, list[Tensor]] = {"tokens": [], "pad": [], "teacher": []}
    pending: tuple[list[Tensor], list[Tensor]] = ([], [])

    def flush() -> None:
        if pending[0]:
            tokens, pad, emb = _encode(student, teacher, *pending, device)
            parts["tokens"].append(tokens.view(-1, len(flips), *tokens.shape[1:]))
            parts["pad"].append(pad.view(-1, len(flips), pad.shape[1]))
            if emb is not None:
                parts["teacher"].append(emb.view(-1, len(flips), emb.shape[1]))
            pending[0].clear()
            pending[1].clear()

    with Progress(
        TextColumn("caching the frozen visual branch"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not show_progress,
    ) as progress:
        task = progress.add_task("cache", total=len(mine))
        for n, k in enumerate(mine):
            row = data[index.first_row[k]]
            name = f"{row.get('source', 'dataset')} image {row['image_id']}"
            img = images.load_row(row, name)
            own_sizes[n] = torch.tensor((img.width, img.height))
            for flipped in flips:
                out = transform.fixed(img, [0.0, 0.0, img.width, img.height], "", flipped)
                pending[0].append(out.image)
                pending[1].append(out.mask)
            if len(pending[0]) >= chunk:
                flush()
            progress.advance(task)
        flush()
    return parts, own_sizes


def _row_tensors(
    dataset: GroundingDataset, transform: GroundingTransform, sizes: np.ndarray
) -> tuple[Tensor, list[tuple[str, ...]], Tensor, Tensor]:
    """Per row and fixed form: the box in the padded frame, the phrase (words swapped under a
    flip) and its tokens: (boxes [rows, flips, 4], phrases, input_ids, attention masks)."""
    flips = transform.fixed_flips() or ()
    data = dataset.data
    bboxes = np.asarray(data["bbox"], dtype=np.float64)
    boxes = torch.stack(
        [torch.from_numpy(transform.fixed_boxes(sizes, bboxes, f)) for f in flips], dim=1
    )
    phrases = [tuple(swap_left_right(p) if f else p for f in flips) for p in data["expression"]]
    # Tokenized once per distinct phrase: rows repeat phrases, and flips often leave them as is.
    encoded = {
        p: encode_phrase(dataset.tokenizer, p, dataset.max_query_len) for ps in phrases for p in ps
    }
    input_ids = torch.tensor([[encoded[p][0] for p in ps] for ps in phrases], dtype=torch.int64)
    masks = torch.tensor([[encoded[p][1] for p in ps] for ps in phrases], dtype=torch.int64)
    return boxes, phrases, input_ids, masks
