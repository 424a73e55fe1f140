"""Evaluation: Acc@0.5, Acc@0.75 and mean IoU per split, exact under several processes.

Boxes are scored under `eval.protocol` (see `protocol`): "transvg" (default) is the
reference's IoU in the padded, normalised SxS frame with the prediction clamped to that
square and the ground truth as TransVG's loader builds it; "pixels" compares in original
image pixels with the prediction clamped to the image.

Rows are batched by image and each image goes through the visual branch once (`shared`);
`shared_visual=False` runs it for every row. Under N processes every process evaluates every
N-th batch; the rows' IoUs are gathered once at the end, and de-duplicated by their "index",
so the count equals the split size exactly.

Metrics are fractions in [0, 1]; tables print them as percentages.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vgdistill.device import make_accelerator, set_cuda_speed_flags, synchronize
from vgdistill.errors import VGError
from vgdistill.evaluation.protocol import row_ious, xyxy_rows
from vgdistill.evaluation.shared import first_occurrence, image_batches, shared_visual

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vgdistill.recipe import Recipe

CONTROLS = ("shuffle",)
METRIC_KEYS = ("acc50", "acc75", "miou", "count")


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


class SplitLoader:
    """One process's share of a split, batched by image, and what scoring needs per row."""

    def __init__(
        self,
        hf_split: Any,
        tokenizer: Any,
        recipe: Recipe,
        batch_size: int,
        accelerator: Accelerator,
    ) -> None:
        from torch.utils.data import DataLoader

        from vgdistill.data.loader import build_loader

        columns = hf_split.column_names
        n = len(hf_split)
        ids = hf_split["image_id"] if "image_id" in columns else None
        batches, self.image_of_row = image_batches(ids, n, batch_size)
        self.xyxy_of_row = xyxy_rows(hf_split["source"] if "source" in columns else None, n)
        self.rows = n
        self.images = int(self.image_of_row.max()) + 1 if n else 0
        # The plain (no shuffle, no augmentation) loader's dataset and settings, fed this
        # process's batches: every N-th one, whole images kept together.
        base = build_loader(
            hf_split, tokenizer, recipe.data, batch_size, train=False, seed=recipe.train.seed
        )
        share = batches[accelerator.process_index :: accelerator.num_processes]
        self.loader = DataLoader(
            base.dataset,
            batch_sampler=share,
            num_workers=base.num_workers,
            collate_fn=base.collate_fn,
            pin_memory=base.pin_memory,
        )


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


@torch.no_grad()
def _row_ious(
    model: torch.nn.Module,
    split: SplitLoader,
    accelerator: Accelerator,
    image_size: int,
    protocol: str,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, IoU) of every row this process scored, on the CPU."""
    device = accelerator.device
    visual_branch = accelerator.unwrap_model(model).visual
    indices, ious = [], []
    for batch in split.loader:
        batch = _on_device(batch, device)
        rows = batch["index"].cpu()
        with accelerator.autocast():
            visual = None
            if shared:
                keys = split.image_of_row[rows]
                visual = shared_visual(visual_branch, batch["image"], batch["image_mask"], keys)
            out = model(
                batch["image"],
                batch["image_mask"],
                batch["input_ids"],
                batch["attention_mask"],
                visual=visual,
            )
        xyxy = split.xyxy_of_row[rows].to(device)
        iou = row_ious(protocol, out.pred_boxes, batch, xyxy, image_size)
        indices.append(rows)
        ious.append(iou.float().cpu())
    if not indices:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(indices), torch.cat(ious)


def _gather(
    accelerator: Accelerator, index: torch.Tensor, iou: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (index, IoU), on every process; shares of unequal length are padded
    with index -1 and those rows dropped."""
    if accelerator.num_processes == 1:
        return index, iou
    device = accelerator.device
    index = accelerator.pad_across_processes(index.to(device), dim=0, pad_index=-1)
    iou = accelerator.pad_across_processes(iou.to(device), dim=0, pad_index=-1)
    index, iou = accelerator.gather(index).cpu(), accelerator.gather(iou).cpu()
    keep = index >= 0
    return index[keep], iou[keep]


def evaluate_split(
    model: torch.nn.Module,
    split: SplitLoader,
    accelerator: Accelerator,
    image_size: int,
    protocol: str,
    shared: bool = True,
    model_name: str = "the model",
) -> dict[str, Any]:
    """Metrics of `model` over one split; every process gets the same dict."""
    was_training = model.training
    model.eval()
    synchronize(accelerator.device)
    start = time.perf_counter()
    try:
        index, iou = _row_ious(model, split, accelerator, image_size, protocol, shared)
        synchronize(accelerator.device)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    index, iou = _gather(accelerator, index, iou)
    # Keep one IoU per row index (a row is scored once, but stay exact whatever the sharding).
    unique, first, _ = first_occurrence(index)
    iou = iou[first]
    count = int(unique.numel())
    if count != split.rows:
        raise RuntimeError(f"evaluation saw {count} distinct rows, the split has {split.rows}")
    bad = int(torch.isnan(iou).sum())
    if bad:
        raise VGError(
            f"{model_name} predicts non-finite boxes (NaN) for {bad} of {count} rows: its "
            "weights are damaged or its training diverged; evaluate another checkpoint"
        )
    return {
        "acc50": float((iou >= 0.5).float().mean()) if count else 0.0,
        "acc75": float((iou >= 0.75).float().mean()) if count else 0.0,
        "miou": float(iou.mean()) if count else 0.0,
        "count": count,
        "images": split.images,
        "expressions_per_s": count / seconds if seconds > 0 else 0.0,
        "images_per_s": split.images / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }


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
    shared_visual: bool = True,
    model_name: str = "the model",
) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on each split: {split: {acc50, acc75, miou, count, images,
    expressions_per_s, images_per_s, seconds}}, scored under recipe.eval.protocol.

    With control='shuffle' each split's dict also holds "shuffle": the same metrics with the
    phrases shuffled across rows. `dataset` (a loaded DatasetDict) and `tokenizer` avoid
    reloading them when the caller has them already; `shared_visual=False` runs the visual
    branch for every row instead of once per image; `model_name` names the model in the
    error for non-finite predictions. Every process must call this.
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

    def score(hf_split: Any) -> dict[str, Any]:
        split = SplitLoader(hf_split, tokenizer, recipe, batch_size, accelerator)
        return evaluate_split(
            model,
            split,
            accelerator,
            recipe.data.image_size,
            recipe.eval.protocol,
            shared=shared_visual,
            model_name=model_name,
        )

    results: dict[str, dict[str, Any]] = {}
    for name in splits:
        metrics = score(dataset[name])
        if control == "shuffle":
            control_metrics = score(shuffle_phrases(dataset[name], recipe.train.seed))
            metrics["shuffle"] = {k: control_metrics[k] for k in METRIC_KEYS}
        results[name] = metrics
    return results


def evaluate_checkpoint(
    run_or_ckpt: Path,
    data: Path | None = None,
    splits: list[str] | None = None,
    control: str | None = None,
    batch_size: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any] | None:
    """Evaluate a checkpoint or run folder (best/, else last/) and record the results.

    `overrides` are `--set` values applied to the checkpoint's recipe (eval.protocol,
    eval.batch_size, data.path, ...). Returns {"checkpoint", "data", "protocol", "processes",
    "control", "results": {split: metrics}} on the main process (None on the others), after
    writing it, for a run folder, to its eval.json and refreshing its curves.png.
    """
    from vgdistill.atomic import unwritable_reason
    from vgdistill.evaluation.inference import load_for_inference
    from vgdistill.report.curves import plot_curves
    from vgdistill.training.rundir import RunDir

    model, recipe, folder = load_for_inference(run_or_ckpt, "cpu", overrides or [])
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
        model_name=f"the checkpoint {folder}",
    )
    if not accelerator.is_main_process:
        return None
    record = {
        "checkpoint": str(run_or_ckpt),
        "data": str(data_path),
        "protocol": recipe.eval.protocol,
        "processes": accelerator.num_processes,
        "control": control,
        "results": results,
    }
    run = RunDir(run_or_ckpt)
    if run.is_run():
        try:
            run.write_eval(record)
            if run.metrics.exists():
                plot_curves(run.metrics, run.curves)
        except (OSError, VGError) as e:  # a read-only run still gets its results shown
            reason = unwritable_reason(e)
            if reason is None:
                raise
            record["not_saved"] = f"could not save {run.eval.name} in {run.root}: {reason}"
    return record
