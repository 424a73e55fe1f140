"""Evaluation: Acc@0.5, Acc@0.75 and mean IoU per split, exact under several processes.

Boxes are compared in ORIGINAL image pixels, as the TransVG reference does: the predicted
normalised cxcywh box in the padded SxS frame is mapped back with the batch's pad and scale.
Under N processes every process evaluates a shard; `gather_for_metrics` drops the samples
Accelerate repeats to even out the last batch, and rows are also de-duplicated by their
"index" so the count equals the split size exactly.

Metrics are fractions in [0, 1]; tables print them as percentages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vgdistill.device import make_accelerator, set_cuda_speed_flags, synchronize
from vgdistill.errors import VGError
from vgdistill.models.boxes import cxcywh_to_xyxy, paired_box_iou

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vgdistill.recipe import Recipe

CONTROLS = ("shuffle",)
METRIC_KEYS = ("acc50", "acc75", "miou", "count")


def to_original_xyxy(
    pred_cxcywh: torch.Tensor,
    image_size: int,
    scale: torch.Tensor,
    pad: torch.Tensor,
    orig_size: torch.Tensor,
) -> torch.Tensor:
    """Map normalised cxcywh boxes in the padded SxS frame to xyxy pixels of the original image."""
    xyxy = cxcywh_to_xyxy(pred_cxcywh.float() * image_size)
    # orig_px = (padded_px - pad) / scale, pad = (left, top)
    offset = pad.float().repeat(1, 2)
    out = (xyxy - offset) / scale.float().view(-1, 1)
    w = orig_size[:, 0].float().view(-1, 1)
    h = orig_size[:, 1].float().view(-1, 1)
    limits = torch.cat([w, h, w, h], dim=1)
    return torch.minimum(out.clamp(min=0), limits)


def shuffle_phrases(hf_split: Any, seed: int) -> Any:
    """The split with every row's phrase taken from another row (a seeded derangement).

    A model that grounds the language should fall towards a no-language baseline on it.
    """
    import numpy as np

    phrases = list(hf_split["expression"])
    n = len(phrases)
    if n < 2:
        return hf_split
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [""] * n
    # Row perm[i] receives the phrase of row perm[i+1]: a single cycle, so no row keeps its own.
    for i in range(n):
        shuffled[perm[i]] = phrases[perm[(i + 1) % n]]
    return hf_split.remove_columns(["expression"]).add_column("expression", shuffled)


@torch.no_grad()
def evaluate_loader(
    model: torch.nn.Module,
    loader: Any,
    accelerator: Accelerator,
    image_size: int,
    expected: int | None = None,
) -> dict[str, float]:
    """Metrics of `model` over a prepared eval loader; every process gets the same dict."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    indices, ious = [], []
    synchronize(device)
    start = time.perf_counter()
    try:
        for batch in loader:
            with accelerator.autocast():
                out = model(
                    batch["image"],
                    batch["image_mask"],
                    batch["input_ids"],
                    batch["attention_mask"],
                )
            pred = to_original_xyxy(
                out.pred_boxes, image_size, batch["scale"], batch["pad"], batch["orig_size"]
            )
            iou = paired_box_iou(pred, batch["orig_boxes"].float())
            index, iou = accelerator.gather_for_metrics((batch["index"], iou))
            indices.append(index.cpu())
            ious.append(iou.float().cpu())
        synchronize(device)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if indices:
        index = torch.cat(indices)
        iou = torch.cat(ious)
        # Keep one IoU per row index (uneven last batches are padded by repeating rows).
        unique, first = _first_occurrence(index)
        iou = iou[first]
    else:
        unique, iou = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    count = int(unique.numel())
    if expected is not None and count != expected:
        raise RuntimeError(f"evaluation saw {count} distinct rows, the split has {expected}")
    return {
        "acc50": float((iou >= 0.5).float().mean()) if count else 0.0,
        "acc75": float((iou >= 0.75).float().mean()) if count else 0.0,
        "miou": float(iou.mean()) if count else 0.0,
        "count": count,
        "images_per_s": count / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }


def _first_occurrence(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of `index` and the position of each one's first occurrence."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel())
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return unique, first


def _eval_loader(
    hf_split: Any, tokenizer: Any, recipe: Recipe, batch_size: int, accelerator: Accelerator
) -> Any:
    """A plain (no shuffle, no augmentation) loader sharded across the processes."""
    from accelerate.data_loader import prepare_data_loader

    from vgdistill.data.loader import build_loader

    loader = build_loader(
        hf_split, tokenizer, recipe.data, batch_size, train=False, seed=recipe.train.seed
    )
    # Not accelerator.prepare(): that would register the loader for checkpointing and keep a
    # reference to it for the life of the run; sharding and device placement are all we need.
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
        non_blocking=accelerator.device.type == "cuda",
    )


def load_splits(data_path: str | Path, splits: list[str]) -> Any:
    """The prepared DatasetDict, checked to hold every split asked for."""
    from vgdistill.data.loader import load_prepared

    data = load_prepared(data_path)
    missing = [s for s in splits if s not in data]
    if missing:
        raise VGError(
            f"{data_path} has no split {', '.join(map(repr, missing))}; "
            f"it has: {', '.join(data.keys())} (choose with --split or eval.splits)"
        )
    return data


def evaluate(
    model: torch.nn.Module,
    recipe: Recipe,
    splits: list[str],
    data_path: str | Path | None = None,
    control: str | None = None,
    accelerator: Accelerator | None = None,
    *,
    dataset: Any = None,
    tokenizer: Any = None,
    batch_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on each split: {split: {acc50, acc75, miou, count, images_per_s, seconds}}.

    With control='shuffle' each split's dict also holds "shuffle": the same metrics with the
    phrases shuffled across rows. `dataset` (a loaded DatasetDict) and `tokenizer` avoid
    reloading them when the caller has them already; every process must call this.
    """
    if control is not None and control not in CONTROLS:
        raise VGError(f"unknown control {control!r}; valid: {', '.join(CONTROLS)}")
    if accelerator is None:
        accelerator = make_accelerator(recipe.train.mixed_precision)
    set_cuda_speed_flags(accelerator.device)
    if dataset is None:
        dataset = load_splits(data_path or recipe.data.path, splits)
    else:
        missing = [s for s in splits if s not in dataset]
        if missing:
            raise VGError(
                f"the dataset has no split {', '.join(map(repr, missing))}; "
                f"it has: {', '.join(dataset.keys())}"
            )
    if tokenizer is None:
        from vgdistill.models.factory import build_tokenizer

        tokenizer = build_tokenizer(recipe.model)
    batch_size = batch_size or recipe.eval.batch_size
    size = recipe.data.image_size

    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        hf_split = dataset[split]
        loader = _eval_loader(hf_split, tokenizer, recipe, batch_size, accelerator)
        metrics: dict[str, Any] = evaluate_loader(model, loader, accelerator, size, len(hf_split))
        if control == "shuffle":
            shuffled = shuffle_phrases(hf_split, recipe.train.seed)
            loader = _eval_loader(shuffled, tokenizer, recipe, batch_size, accelerator)
            control_metrics = evaluate_loader(model, loader, accelerator, size, len(hf_split))
            metrics["shuffle"] = {k: control_metrics[k] for k in METRIC_KEYS}
        results[split] = metrics
    return results


def evaluate_checkpoint(
    run_or_ckpt: Path,
    data: Path | None = None,
    splits: list[str] | None = None,
    control: str | None = None,
    batch_size: int | None = None,
    json_out: Path | None = None,
) -> dict[str, Any] | None:
    """Evaluate a checkpoint or run folder (best/, else last/) and record the results.

    Returns {"checkpoint", "data", "processes", "control", "results": {split: metrics}} on the
    main process (None on the others), after writing it to `json_out` and, for a run folder,
    to its eval.json, refreshing its curves.png too.
    """
    from vgdistill.atomic import write_text
    from vgdistill.models.checkpoint import load_checkpoint
    from vgdistill.report.curves import plot_curves
    from vgdistill.training.rundir import RunDir

    model, recipe = load_checkpoint(run_or_ckpt)
    accelerator = make_accelerator(recipe.train.mixed_precision)
    model.to(accelerator.device).eval()
    data_path = data or Path(recipe.data.path)
    results = evaluate(
        model,
        recipe,
        list(splits or recipe.eval.splits),
        data_path=data_path,
        control=control,
        accelerator=accelerator,
        batch_size=batch_size,
    )
    if not accelerator.is_main_process:
        return None
    record = {
        "checkpoint": str(run_or_ckpt),
        "data": str(data_path),
        "processes": accelerator.num_processes,
        "control": control,
        "results": results,
    }
    if json_out is not None:
        write_text(json_out, json.dumps(record, indent=2) + "\n")
    run = RunDir(run_or_ckpt)
    if run.is_run():
        run.write_eval(record)
        if run.metrics.exists():
            plot_curves(run.metrics, run.curves)
    return record
