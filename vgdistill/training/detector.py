"""Pretrain the student's visual branch as an object detector, TransVG's DETR start made local.

TransVG does not train its visual branch from scratch: backbone and encoder start from a DETR
detector trained on COCO, so the grounding stage begins with tokens that already say "a red
circle is here". No detector weights can be downloaded here, so `vgdistill detector` learns
one on the object boxes a prepared dataset carries (its `objects` column; `shapes` writes
every object of every image) and saves it under DETR's key names, which the recipe key
`model.detr_checkpoint` loads like a real DETR checkpoint.

The detector. Every visual token of the encoder output predicts, through one linear head,
whether it lies on an object, that object's category, and the object's box; the targets are
built in vgdistill.data.detection, the loss in vgdistill.losses.detection. Every cell of an
object is marked, not only its centre: the grounding model then finds the object's category
and box on whichever of its tokens it attends to, which grounds far better than centre cells
alone. This is a one-stage grid detector (YOLO-style), not DETR's set prediction: TransVG
keeps only DETR's backbone and encoder, and the grid loss trains exactly those parts, cheaply.

Reported on the validation split (vgdistill.evaluation.detection): the share of objects
"found" at their centre cell and the category accuracy there.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__
from vgdistill.atomic import build_dir, exclusive, write_text
from vgdistill.recipe.shipped import run_name
from vgdistill.training import fitted

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch
    from rich.console import Console

    from vgdistill.data.detection import DetectionImages
    from vgdistill.models.visual import VisualBranch
    from vgdistill.recipe import DetectorConfig, Recipe

WEIGHTS_FILE = "detr.safetensors"
REPORT_FILE = "detector.json"
FORMAT_VERSION = 1
EVAL_EVERY = 100  # steps between validation lines in metrics.jsonl


def default_out(recipe: Recipe, recipe_path: str | Path) -> Path:
    """Where the detector goes without --out: the folder of model.detr_checkpoint when that
    names this command's weights file (so the recipe's training finds it), else
    runs/detector-<recipe name>."""
    checkpoint = Path(recipe.model.detr_checkpoint)
    if recipe.model.detr_checkpoint and checkpoint.name == WEIGHTS_FILE:
        return checkpoint.parent
    return Path("runs") / f"detector-{run_name(recipe_path)}"


# --------------------------------------------------------------------------- model


def build_visual(recipe: Recipe) -> VisualBranch:
    """The student's visual branch (backbone + input projection + DETR encoder) for `recipe`."""
    from vgdistill.models.backbones import Backbone
    from vgdistill.models.visual import VisualBranch

    m = recipe.model
    backbone = Backbone(m.backbone)
    if m.backbone_weights:
        backbone.load_weights(m.backbone_weights)
    return VisualBranch(backbone, m.hidden_dim, m.enc_layers, m.enc_heads, m.enc_ffn, m.dropout)


def visual_to_detr_state(visual: VisualBranch) -> dict[str, torch.Tensor]:
    """The branch's weights under DETR's key names (the inverse of the DETR import)."""
    from vgdistill.models.visual import DETR_PREFIXES

    back = {dst: src for src, dst in DETR_PREFIXES.items()}
    state = {}
    for key, value in visual.state_dict().items():
        for dst, src in back.items():
            if key.startswith(dst):
                state[src + key[len(dst) :]] = value.detach().cpu().contiguous()
                break
    return state


# --------------------------------------------------------------------------- fitting


def _settings_key(recipe: Recipe) -> dict[str, Any]:
    """What must match for an existing detector folder to be reused."""
    m = recipe.model
    return {
        "data_path": str(Path(recipe.data.path).resolve()),
        "train_split": recipe.data.train_split,
        "val_split": recipe.data.val_split,
        "image_size": recipe.data.image_size,
        "visual": {
            k: getattr(m, k)
            for k in ("backbone", "backbone_weights", "hidden_dim", "enc_layers", "enc_heads")
            + ("enc_ffn", "dropout")
        },
        "fit": {**dataclasses.asdict(recipe.detector), "seed": recipe.train.seed},
    }


def fit_detector(
    recipe: Recipe,
    out: str | Path,
    force: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) the grid detector on `recipe`'s data and write it to `out`.

    Settings come from the recipe's [detector] section (seed: train.seed). Returns the
    detector.json report plus "reused". A complete `out` trained with the same settings is
    reused unless `force`; the folder appears whole or not at all.
    """
    import torch
    from rich.console import Console

    from vgdistill.data.detection import DetectionImages, objects_split
    from vgdistill.device import resolve_device

    console = console or Console(stderr=True)
    settings = recipe.detector
    out = Path(out)
    key = _settings_key(recipe)
    with exclusive(out, "another `vgdistill detector`", whole=True):
        reused = fitted.reusable_report(out, REPORT_FILE, WEIGHTS_FILE, key, "detector", force)
        if reused is not None:
            return reused

        t0 = time.perf_counter()
        train_ds = objects_split(recipe.data.path, recipe.data.train_split)
        val_ds = objects_split(recipe.data.path, recipe.data.val_split)
        # Validation objects of a category that training never shows count as misses.
        categories = sorted(
            {c for ds in (train_ds, val_ds) for o in ds["objects"] for c in o["category"]}
        )
        torch.manual_seed(recipe.train.seed)
        device = resolve_device()
        visual = build_visual(recipe)
        grid = visual.backbone.feature_size(recipe.data.image_size)
        stride = visual.backbone.stride
        head = torch.nn.Linear(visual.dim, 1 + len(categories) + 4)
        visual.to(device)
        head.to(device)
        data = {
            name: DetectionImages(ds, categories, recipe.data.image_size, grid, stride)
            for name, ds in (("train", train_ds), ("val", val_ds))
        }
        for images in data.values():
            images.load_cache(recipe.data.num_workers)
        with build_dir(out) as tmp:
            report = _train(
                visual, head, data, grid, device, settings, recipe, tmp, console, progress
            )
            report.update(
                format_version=FORMAT_VERSION,
                vgdistill_version=__version__,
                complete=True,
                settings=key,
                categories=categories,
                grid=[grid, grid],
                data={
                    "path": recipe.data.path,
                    "train_images": len(data["train"]),
                    "val_images": len(data["val"]),
                },
                device=str(device),
                time_s=round(time.perf_counter() - t0, 2),
            )
            from safetensors.torch import save_file

            from vgdistill.models.files import CHECKSUMS, sha256_file

            save_file(visual_to_detr_state(visual), str(tmp / WEIGHTS_FILE))
            # checked wherever model.detr_checkpoint loads the file (models.visual)
            report[CHECKSUMS] = {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}
            write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return {**report, "reused": False}


def _loaders(data: dict[str, DetectionImages], batch_size: int, recipe: Recipe) -> tuple[Any, Any]:
    """The shuffled training loader (seeded by train.seed) and the validation loader."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(recipe.train.seed)
    # Decoded images are served from memory; worker processes would only copy them.
    workers = 0 if data["train"].cache is not None else recipe.data.num_workers
    train_loader = DataLoader(
        data["train"],
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(data["train"]) >= batch_size,
        generator=generator,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    val_loader = DataLoader(data["val"], batch_size=256, num_workers=workers)
    return train_loader, val_loader


def _train(
    visual: VisualBranch,
    head: torch.nn.Module,
    data: dict[str, DetectionImages],
    grid: int,
    device: torch.device,
    settings: DetectorConfig,
    recipe: Recipe,
    folder: Path,
    console: Console,
    show_progress: bool,
) -> dict[str, Any]:
    """The training loop; one metrics.jsonl line per EVAL_EVERY steps into `folder`."""
    from vgdistill.evaluation.detection import evaluate_detector
    from vgdistill.losses.detection import detection_loss, valid_cells
    from vgdistill.training.loop import Callbacks, FitLoop, nonfinite_error
    from vgdistill.training.metrics import METRICS_FILE, MetricsLog
    from vgdistill.training.optim import adamw, warmup_cosine_scheduler

    train_loader, val_loader = _loaders(data, settings.batch_size, recipe)
    opt = adamw(
        [{"params": [p for p in [*visual.parameters(), *head.parameters()] if p.requires_grad]}],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        device_type=device.type,
    )
    metrics, t0, history = MetricsLog(folder / METRICS_FILE), time.perf_counter(), []

    def step_fn(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        image, mask, obj, cat, box, _ = batch
        image, mask = image.to(device), mask.to(device)
        tokens, _, _ = visual(image, mask)
        valid = valid_cells(mask, grid)
        return detection_loss(
            head(tokens).float(), obj.to(device), cat.to(device), box.to(device), valid
        )

    def on_step(loop: FitLoop, loss: torch.Tensor, parts: dict[str, float]) -> None:
        step = loop.position.step
        bar.update(task, loss=f"{loss.item():.3f}")
        if step % EVAL_EVERY != 0 and step != settings.steps:
            return
        found = evaluate_detector(visual, head, val_loader, device)
        line = {
            "type": "detector",
            "step": step,
            **{f"loss_{k}": round(v, 4) for k, v in parts.items()},
            **{f"val_{k}": v for k, v in found.items()},
            "time_s": round(time.perf_counter() - t0, 2),
        }
        history.append(line)
        metrics.write(line)
        if show_progress:
            bar.console.print(
                f"step {step}: loss {loss.item():.3f}  val objects found@0.5 "
                f"{line['val_found50']:.3f}  category {line['val_category_acc']:.3f}",
                highlight=False,
            )

    visual.train()
    with fitted.fit_progress("[bold]detector[/]", console, show_progress) as bar:
        task = bar.add_task("fit", total=settings.steps, loss="-")
        loop = FitLoop(
            step_fn,
            opt,
            nonfinite_error("detector"),
            scheduler=warmup_cosine_scheduler(opt, settings.warmup_steps, settings.steps),
            check_every_step=True,
            max_steps=settings.steps,
            progress=bar,
            task=task,
        )
        loop.run(lambda epoch, skip: train_loader, Callbacks(on_step=on_step))
    visual.eval()
    return {
        "metrics": {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")},
        "history": history,
        "fit_s": round(time.perf_counter() - t0, 2),
        "steps": loop.position.step,
    }
