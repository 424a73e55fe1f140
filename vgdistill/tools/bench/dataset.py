"""`vgdistill bench --data PATH`: the training loader and evaluation on a real prepared dataset.

Loader, per core: the training loader (decode, the recipe's augmentation, tokenize, collate,
and the hand-over to the training process) over the training split in one worker process, two
ways, window by window in turn: "uint8", the batches as training gets them (the model
normalises on its device), and "float in the worker", the same samples normalised to ImageNet
float32 in the worker, as the transform did before its images became uint8. Both loaders have
the same seed, so they draw the same samples with the same augmentation: the figures record
each one's flip share, mean scale, box and image area, and whether the float pixels are the
uint8 ones normalised.

Evaluation: the recipe's student with random weights (speed does not depend on them) on the
first images of the evaluation split, every expression of each, with one visual pass per image
("shared") and one per expression ("per row"): images/s, expressions/s and Acc@0.5 of each.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from vgdistill.device import make_accelerator, synchronize
from vgdistill.errors import VGError
from vgdistill.recipe import Recipe
from vgdistill.tools.bench.synthetic import quiet
from vgdistill.tools.bench.timing import paired_rates

if TYPE_CHECKING:
    from vgdistill.tools.bench import BenchOptions

LOADER_PATHS = ("uint8", "float_in_worker")
# One worker process per loader: its images/s is one core's, with the hand-over of every
# batch to the training process (shared memory) included. DataLoader's default prefetch.
LOADER_WORKERS = 1
PREFETCH = 2
EVAL_PATHS = ("shared", "per_row")


def float_as_before(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A uint8 sample [3,S,S] as the transform built it before its output became uint8: the
    image region converted to float, ImageNet-normalised and placed in a float32 zero square."""
    from vgdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    rows, cols = (~mask).any(1).nonzero(), (~mask).any(0).nonzero()
    out = torch.zeros(image.shape, dtype=torch.float32)
    if len(rows) and len(cols):
        top, bottom = int(rows[0]), int(rows[-1]) + 1
        left, right = int(cols[0]), int(cols[-1]) + 1
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        region = image[:, top:bottom, left:right].float() / 255.0
        out[:, top:bottom, left:right] = (region - mean) / std
    return out


class FloatInWorker(Dataset):
    """A loader dataset whose samples leave it ImageNet-normalised float32, as before."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        sample["image"] = float_as_before(sample["image"], sample["image_mask"])
        return sample


def _loaders(split: Any, tokenizer: Any, recipe: Recipe, batch: int) -> dict[str, DataLoader]:
    """The two loader paths over `split`: same seed, same samples, one worker process each."""
    from vgdistill.tools.bench.timing import training_loader

    loaders = {
        path: training_loader(split, tokenizer, recipe, batch, LOADER_WORKERS)
        for path in LOADER_PATHS
    }
    # The loader's dataset is the SeededDataset over the GroundingDataset: the per-sample
    # seeds stay, and the normalisation comes after the transform, in the worker.
    seeded = loaders["float_in_worker"].dataset
    seeded.dataset = FloatInWorker(seeded.dataset)
    return loaders


class AugmentStats:
    """Running sums of what the augmentation drew, from the batch fields both paths share."""

    def __init__(self) -> None:
        self.n = 0
        self.flips = 0
        self.scale = 0.0
        self.box = torch.zeros(4, dtype=torch.float64)
        self.area = 0.0

    def add(self, batch: dict[str, Any]) -> None:
        """Count one batch."""
        self.n += int(batch["scale"].numel())
        self.flips += int((batch["scale"] < 0).sum())  # a flip makes the x scale negative
        self.scale += float(batch["scale"].double().abs().sum())
        self.box += batch["boxes"].double().sum(0)
        self.area += float((~batch["image_mask"]).double().mean((1, 2)).sum())

    def summary(self) -> dict[str, Any]:
        """Means per sample (shares in [0, 1])."""
        n = max(self.n, 1)
        return {
            "samples": self.n,
            "flip_share": self.flips / n,
            "mean_scale": self.scale / n,
            "mean_box_cxcywh": (self.box / n).tolist(),
            "mean_image_area": self.area / n,
        }


def _window(loader: DataLoader, skip: int, steps: int, stats: AugmentStats) -> tuple[float, Any]:
    """Images/s of `steps` batches from a fresh iterator after `skip` untimed ones (the
    worker's start-up and its prefetched batches), and the first timed batch."""
    it = iter(loader)
    for _ in range(skip):
        next(it)
    seconds, images, first = 0.0, 0, None
    for _ in range(steps):
        start = time.perf_counter()
        b = next(it)
        seconds += time.perf_counter() - start
        images += int(b["input_ids"].shape[0])
        stats.add(b)
        first = b if first is None else first
    del it  # ends the worker before the other path's window
    return images / seconds, first


def measure_loader(
    split: Any, tokenizer: Any, recipe: Recipe, batch: int, opts: BenchOptions
) -> dict[str, Any]:
    """Loader images/s per core of both paths, one window of each in turn."""
    from vgdistill.models.visual import normalize_pixels

    loaders = _loaders(split, tokenizer, recipe, batch)
    # A fresh iterator per window starts the worker afresh (untimed: its start-up and the
    # batches it prefetched meanwhile); the r-th iterators of both loaders draw the same rows.
    skip = opts.warmup + LOADER_WORKERS * PREFETCH
    rates: dict[str, list[float]] = {k: [] for k in LOADER_PATHS}
    stats = {k: AugmentStats() for k in LOADER_PATHS}
    first: dict[str, dict[str, Any]] = {}
    for r in range(opts.repeats):
        for path in LOADER_PATHS if r % 2 == 0 else LOADER_PATHS[::-1]:
            rate, b = _window(loaders[path], skip, opts.steps, stats[path])
            rates[path].append(rate / LOADER_WORKERS)
            first.setdefault(path, b)
    new, old = first["uint8"], first["float_in_worker"]
    same_pixels = new["image"].dtype == torch.uint8 and torch.equal(
        normalize_pixels(new["image"], new["image_mask"]), old["image"]
    )
    summaries = {k: s.summary() for k, s in stats.items()}
    return {
        "split_rows": len(split),
        "batch_size": batch,
        "image_size": recipe.data.image_size,
        "augment": recipe.data.augment,
        "augment_ops": list(recipe.data.augment_ops) if recipe.data.augment else [],
        "crop": recipe.data.crop,
        "workers": LOADER_WORKERS,
        **{
            k: {"images_per_s": statistics.median(v), "repeats": v, "augmentation": summaries[k]}
            for k, v in rates.items()
        },
        "speedup": paired_rates(rates["uint8"], rates["float_in_worker"]),
        "same_augmentation": summaries["uint8"] == summaries["float_in_worker"],
        "same_pixels": bool(same_pixels),
    }


def eval_windows(split: Any, rows: int, windows: int) -> list[Any]:
    """The rows of the split's first images (in order of appearance, every expression of each)
    until at least `rows` are taken, cut into `windows` parts of whole images."""
    from vgdistill.data.images import ImageIndex

    by_image = ImageIndex.from_ids(split["image_id"]).rows_of()
    taken: list[list[int]] = []
    for image_rows in by_image:
        if sum(map(len, taken)) >= rows:
            break
        taken.append(image_rows)
    n = min(windows, len(taken))
    parts = [taken[i * len(taken) // n : (i + 1) * len(taken) // n] for i in range(n)]
    return [split.select(sorted(r for image in part for r in image)) for part in parts]


def _eval_accelerator(recipe: Recipe, device: torch.device) -> Any:
    """An Accelerator on `device` at the recipe's precision."""
    from accelerate import Accelerator

    if device.type == "cpu" and torch.cuda.is_available():
        return Accelerator(cpu=True, mixed_precision=recipe.train.mixed_precision)
    return make_accelerator(recipe.train.mixed_precision)


def measure_eval(
    data: Any,
    split_name: str,
    tokenizer: Any,
    recipe: Recipe,
    device: torch.device,
    opts: BenchOptions,
) -> dict[str, Any]:
    """Evaluation with the shared visual pass and per row on the same rows: the rows are cut
    into `repeats` windows of whole images, each evaluated both ways in turn."""
    import datasets

    from vgdistill.evaluation.evaluate import evaluate
    from vgdistill.models.factory import build_model

    windows = eval_windows(data[split_name], opts.eval_rows, opts.repeats)
    # Loader workers beyond the cores would only compete with the model for them.
    workers = min(recipe.data.num_workers, os.cpu_count() or 1)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, num_workers=workers))
    acc = _eval_accelerator(recipe, device)
    torch.manual_seed(opts.seed)
    model = build_model(recipe, load_weights=False).to(acc.device).eval()
    batch = opts.eval_batch_size or opts.batch_size or recipe.eval.batch_size

    def run(rows: Any, shared: bool) -> dict[str, Any]:
        dataset = datasets.DatasetDict({split_name: rows})
        out = evaluate(model, recipe, [split_name], accelerator=acc, dataset=dataset,
                       tokenizer=tokenizer, batch_size=batch, shared_visual=shared)  # fmt: skip
        return out[split_name]

    if opts.warmup:
        first = eval_windows(windows[0], 1, 1)[0]  # the first image's rows
        for shared in (True, False):
            run(first, shared)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in EVAL_PATHS}
    for r, rows in enumerate(windows):
        for path in EVAL_PATHS if r % 2 == 0 else EVAL_PATHS[::-1]:
            synchronize(acc.device)
            runs[path].append(run(rows, path == "shared"))
    return _eval_figures(runs, batch)


def _eval_figures(runs: dict[str, list[dict[str, Any]]], batch: int) -> dict[str, Any]:
    """Per path over all windows: images/s, expressions/s, Acc@0.5 and mean IoU; the
    shared / per-row ratio paired window by window."""
    out: dict[str, Any] = {"batch_size": batch}
    for path, results in runs.items():
        rows = sum(r["count"] for r in results)
        seconds = sum(r["seconds"] for r in results)
        out["rows"] = rows
        out[path] = {
            "images": sum(r["images"] for r in results),
            "seconds": seconds,
            "expressions_per_s": rows / seconds,
            "images_per_s": sum(r["images"] for r in results) / seconds,
            "repeats": [r["expressions_per_s"] for r in results],
            "acc50": sum(r["acc50"] * r["count"] for r in results) / rows,
            "miou": sum(r["miou"] * r["count"] for r in results) / rows,
        }
    shared, per_row = runs["shared"], runs["per_row"]
    out["speedup"] = paired_rates(
        [r["expressions_per_s"] for r in shared], [r["expressions_per_s"] for r in per_row]
    )
    # Window by window: the same rows scored the same (a hit is a hit on both paths).
    pairs = list(zip(shared, per_row, strict=True))
    out["same_acc50"] = all(a["acc50"] == b["acc50"] for a, b in pairs)
    out["miou_difference"] = max(abs(a["miou"] - b["miou"]) for a, b in pairs)
    return out


def measure_dataset(
    recipe: Recipe, tokenizer: Any, device: torch.device, opts: BenchOptions, say: Any
) -> dict[str, Any]:
    """The loader and evaluation figures on the prepared dataset at opts.data_path."""
    from vgdistill.data.manifest import load_prepared

    assert opts.data_path is not None
    with quiet():
        data = load_prepared(opts.data_path)
    train, val = recipe.data.train_split, recipe.data.val_split
    for name in (train, val):
        if name not in data:
            raise VGError(
                f"{opts.data_path} has no split {name!r} (it has: {', '.join(data.keys())}); "
                "choose with --set data.train_split=... / data.val_split=..."
            )
    batch = opts.batch_size or recipe.train.batch_size
    say(f"loader on {train} ({batch} per batch, one core)")
    loader = measure_loader(data[train], tokenizer, recipe, batch, opts)
    say(f"evaluation on {val}, shared visual pass vs per row")
    evaluation = measure_eval(data, val, tokenizer, recipe, device, opts)
    return {
        "path": str(opts.data_path),
        "train_split": train,
        "eval_split": val,
        "loader": loader,
        "eval": evaluation,
    }
