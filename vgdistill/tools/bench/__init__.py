"""`vgdistill bench`: how fast a recipe trains and evaluates on this machine, and why.

Everything is built offline with random weights (student and teacher): speed does not depend
on the weights. Step timings use synthetic batches of the recipe's shapes (image_size,
max_query_len) run through the same module, loss, teacher, optimiser and optimiser step as
training (`DistillationTask`, `build_optimizer`, `optimizer_step`); the data figure runs the
training loader itself (decode + augment + tokenize + collate, with the recipe's workers) over
a small prepared dataset of JPEG images generated in a temporary folder. When the recipe trains
on cached visual tokens (a frozen visual branch, `vgdistill.training.visual_cache`), the step
training actually runs is timed too: BERT, the fusion and the head on tokens and teacher image
embeddings computed once from the synthetic batches.

Method: warm-up steps first, device synchronisation around every timed window, and the
median of `repeats` windows. The fast path (the defaults) and the plain path (every speed
feature off: explicit softmax attention, contiguous convolutions, fp32, torch's default AdamW,
no TF32 / cuDNN autotuning, teacher in fp32 without its phrase cache) run interleaved window by
window in one process, so their ratio holds on a noisy, shared machine. With `each=True`
every speed feature is also switched off alone, which gives its own before/after figure.

With a prepared dataset (`data_path`, `vgdistill bench --data PATH`) bench measures that
dataset instead: the training loader per core with uint8 images against normalising in the
loader, and evaluation with one visual pass per image against one per expression (`dataset`).

Modules: `fastpath` (the switches), `synthetic` (batches, phrases, a prepared split), `rig`
(models, steps, FLOPs), `timing` (windows, memory, data pipeline), `targets` (GPU targets),
`dataset` (a real prepared dataset).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vgdistill.errors import VGError
from vgdistill.recipe import Recipe

__all__ = ["BenchOptions", "bench_file", "run_bench"]

log = logging.getLogger("vgdistill")


@dataclass
class BenchOptions:
    """What `run_bench` measures and how long."""

    device: str | None = None
    """'cpu', 'cuda' or 'cuda:N'; None = CUDA when available."""
    batch_size: int | None = None
    """Training batch; None = train.batch_size."""
    eval_batch_size: int | None = None
    """Evaluation batch; None = batch_size when given, else eval.batch_size."""
    steps: int = 10
    """Steps (batches) per timed window."""
    warmup: int = 3
    """Untimed steps before the first window of each configuration."""
    repeats: int = 3
    """Timed windows per configuration; figures are their median."""
    data: bool = True
    """Measure the data pipeline."""
    plain: bool = True
    """Measure the plain path beside the fast path."""
    each: bool = False
    """Also switch each speed feature off alone."""
    threads: int | None = None
    """torch intra-op threads (CPU); None = leave torch's default."""
    seed: int = 0
    """Seed of the random weights and synthetic data."""
    data_path: str | None = None
    """A prepared dataset: measure the loader and evaluation on it (`dataset`) instead."""
    eval_rows: int = 256
    """With data_path: evaluate the first images of the split up to this many rows."""


def bench_file(
    recipe_file: Path,
    overrides: list[str] | None,
    opts: BenchOptions,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`run_bench` on a recipe file with `--set` overrides; the result names both."""
    from vgdistill.recipe import load_recipe

    result = run_bench(load_recipe(recipe_file, overrides), opts, progress)
    result["recipe"]["file"] = str(recipe_file)
    result["recipe"]["overrides"] = list(overrides or [])
    return result


def _check_counts(opts: BenchOptions) -> None:
    """One-line errors for step counts that cannot be measured."""
    for name in ("steps", "repeats", "eval_rows"):
        if getattr(opts, name) < 1:
            raise VGError(f"--{name.replace('_', '-')} must be >= 1")
    if opts.warmup < 0:
        raise VGError("--warmup must be >= 0")


def _batches(recipe: Recipe, opts: BenchOptions, device: torch.device) -> tuple[int, int]:
    """Training and evaluation batch sizes; one-line errors for what cannot be measured."""
    batch = opts.batch_size or recipe.train.batch_size
    eval_batch = opts.eval_batch_size or opts.batch_size or recipe.eval.batch_size
    if batch < 1 or eval_batch < 1:
        raise VGError("--batch-size must be >= 1")
    if recipe.train.mixed_precision == "fp16" and device.type != "cuda":
        raise VGError(
            "train.mixed_precision = 'fp16' needs a GPU; use --set train.mixed_precision=bf16"
        )
    return batch, eval_batch


def _header(
    recipe: Recipe, device: torch.device, batch: int, eval_batch: int, opts: BenchOptions
) -> dict[str, Any]:
    """What was measured, where, and how: the result's first keys."""
    from vgdistill.tools.bench.timing import device_name, load_average

    return {
        "recipe": {
            "backbone": recipe.model.backbone,
            "preset": recipe.model.preset,
            "image_size": recipe.data.image_size,
            "max_query_len": recipe.data.max_query_len,
            "mixed_precision": recipe.train.mixed_precision,
            "distill_modality": recipe.distill.modality,
            "teacher": recipe.distill.teacher,
            "num_workers": recipe.data.num_workers,
        },
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # Provenance for CPU figures: a loaded shared machine makes absolute numbers noisy
        # (the paired ratios hold better).
        "load_average_start": load_average(),
        "batch_size": batch,
        "eval_batch_size": eval_batch,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
    }


def run_bench(
    recipe: Recipe,
    opts: BenchOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure `recipe` (see the module docstring); returns the JSON-ready result."""
    from vgdistill.device import resolve_device, resolve_precision
    from vgdistill.models.factory import build_tokenizer
    from vgdistill.tools.bench.dataset import measure_dataset
    from vgdistill.tools.bench.figures import model_figures
    from vgdistill.tools.bench.rig import Rig, bench_recipe
    from vgdistill.tools.bench.targets import compare_targets
    from vgdistill.tools.bench.timing import load_average, measure_data

    opts = opts or BenchOptions()
    _check_counts(opts)
    say = progress or (lambda msg: log.debug(msg))
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    recipe = bench_recipe(recipe)
    batch, eval_batch = _batches(recipe, opts, device)
    # What training would run at here ("auto" asks Accelerate, else bf16 on a GPU).
    precision, _ = resolve_precision(recipe.train.mixed_precision, cuda=device.type == "cuda")
    recipe = dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, mixed_precision=precision)
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = _header(recipe, device, batch, eval_batch, opts)
    if opts.data_path is not None:
        tokenizer = build_tokenizer(recipe.model)
        result["dataset"] = measure_dataset(recipe, tokenizer, device, opts, say)
        result["load_average_end"] = load_average()
        return result
    if opts.data:
        say("data pipeline")
        result["data"] = measure_data(recipe, build_tokenizer(recipe.model), batch, opts, device)
    say("building the model (random weights)")
    rig = Rig(recipe, device, batch, eval_batch, opts.seed)
    result.update(model_figures(rig, opts, say))
    if "data" in result:
        per = result["data"]["images_per_s_one_process"]
        need = result["train"]["fast"][
            "images_per_s_with_teacher" if rig.teacher else "images_per_s"
        ]
        result["data"]["workers_to_keep_up"] = math.ceil(need / per) if per > 0 else None
    if device.type == "cuda":
        result["targets"] = compare_targets(recipe.model.backbone, result)
    result["load_average_end"] = load_average()
    return result
