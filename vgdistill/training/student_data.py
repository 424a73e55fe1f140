"""The student stage's training batches: the seeded loader (or cached visual tokens) and the
frozen teacher's text cache filled up front."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vgdistill.data.loader import SeededDataset
from vgdistill.recipe import Recipe

log = logging.getLogger("vgdistill")


def prewarm_text_cache(teacher: Any, recipe: Recipe, train_split: Any) -> None:
    """Embed every training phrase once, in a fixed order and fixed chunks, up front.

    A CLIP text embedding can differ in its last bits with the batch it was computed in;
    filling the frozen teacher's per-phrase cache this way makes the targets independent
    of batch composition (so a resumed run matches an uninterrupted one bit for bit), and
    takes the text tower out of the training step altogether.
    """
    if recipe.distill.teacher_trainable or recipe.distill.modality not in ("both", "text"):
        return
    phrases = set(train_split["expression"])
    if recipe.data.augment:
        from vgdistill.data.spatial_words import swap_left_right

        phrases |= {swap_left_right(p) for p in phrases}
    ordered = sorted(phrases)
    if len(ordered) > getattr(teacher, "cache_size", len(ordered)):
        return  # would not fit: the cache fills lazily instead
    chunk = 256
    for i in range(0, len(ordered), chunk):
        teacher.encode(None, ordered[i : i + chunk], want_image=False, want_text=True)


def warn_large_batch(recipe: Recipe, rows: int, processes: int) -> None:
    """Warn when a step asks for more rows than the training split holds (call it once)."""
    t = recipe.train
    if t.batch_size * processes > rows:
        log.warning(
            "train.batch_size %d x %d process(es) is more than the %d rows of the %r split: "
            "every step takes at most %d rows per process",
            t.batch_size,
            processes,
            rows,
            recipe.data.train_split,
            -(-rows // processes),
        )


def cached_rows(
    recipe: Recipe,
    dataset: Any,
    student: nn.Module,
    teacher: Any,
    acc: Any,
    show_progress: bool,
) -> Any:
    """The training rows over cached visual tokens, or None to train from pixels."""
    from vgdistill.training.visual_cache import build_cached_rows, cache_blocker

    why_not = cache_blocker(recipe)
    if why_not is not None:
        log.debug("visual tokens not cached: %s", why_not)
        return None
    with acc.autocast():
        return build_cached_rows(
            recipe,
            dataset,
            student.to(acc.device),
            teacher if recipe.distill.modality in ("both", "image") else None,
            acc,
            show_progress=show_progress,
        )


def seeded_loader(loader: Any, seed: int, cached: Any = None) -> tuple[Any, Any]:
    """`loader` rebuilt over `SeededDataset` (or over `cached` rows), with its own generator.

    Returns (loader, dataset). Its own generator keeps the iterator's start (which draws a
    worker base seed) from consuming the global RNG; workers are not persistent so each
    epoch's seed reaches them. Cached rows come whole batches at a time, in the main process.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from vgdistill.training.visual_cache import whole_batch

    dataset = SeededDataset(loader.dataset, seed) if cached is None else cached
    kwargs: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "shuffle": isinstance(loader.sampler, RandomSampler),
        "collate_fn": loader.collate_fn if cached is None else whole_batch,
        "num_workers": loader.num_workers if cached is None else 0,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "generator": torch.Generator().manual_seed(seed),
    }
    if kwargs["num_workers"] > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["worker_init_fn"] = loader.worker_init_fn
    return DataLoader(dataset, **kwargs), dataset
