"""`vgdistill detector`: pretrain the visual branch as an object detector (TransVG's DETR start)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import (
    SetOption,
    console,
    err_console,
    flag_overrides,
    friendly,
    lr_option,
    out_option,
)


@friendly
def command(
    recipe: Annotated[
        Path,
        typer.Argument(help="Recipe: its data.*, model.* (visual branch) and detector.* keys."),
    ],
    set_: SetOption = None,
    out: Annotated[
        Path | None,
        out_option(
            "Output folder (default: the folder of model.detr_checkpoint when it names "
            "detr.safetensors, else runs/detector-NAME, NAME being the recipe name)."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (overrides detector.steps).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per batch (overrides detector.batch_size).")
    ] = None,
    lr: Annotated[float | None, lr_option("detector")] = None,
    force: Annotated[
        bool, typer.Option(help="Retrain even if --out holds a finished detector.")
    ] = False,
) -> None:
    """Pretrain the student's backbone and DETR encoder as an object detector.

    TransVG starts its visual branch from a COCO-trained DETR; this trains the same parts on
    the object boxes of a prepared dataset (`prepare shapes` writes them) with a grid
    detection head, then saves them under DETR's key names.

    Writes detr.safetensors (load it with --set model.detr_checkpoint=OUT/detr.safetensors)
    and detector.json; prints the share of validation objects found at IoU 0.5.

    Examples:

      vgdistill detector recipes/demo.toml --out runs/detector-demo

      vgdistill detector recipes/tiny.toml --steps 800 --force
    """
    from vgdistill.recipe import load_recipe
    from vgdistill.report.tables import detector_table
    from vgdistill.training.detector import WEIGHTS_FILE, default_out, fit_detector

    overrides = flag_overrides("detector", steps=steps, batch_size=batch_size, lr=lr)
    rec = load_recipe(recipe, [*(set_ or []), *overrides])
    target = out if out is not None else default_out(rec, recipe)
    report = fit_detector(rec, target, force=force, console=err_console)
    if report["reused"]:
        err_console.print(f"{target} already holds this detector (use --force to retrain)")
    console.print(detector_table(report, rec.data.val_split))
    weights = Path(target) / WEIGHTS_FILE
    console.print(
        f"detector: {report['steps']} steps in {report['fit_s']:.0f}s -> {weights}",
        highlight=False,
        soft_wrap=True,
    )
    if (
        not rec.model.detr_checkpoint
        or Path(rec.model.detr_checkpoint).resolve() != weights.resolve()
    ):
        console.print(
            f"use it with: --set model.detr_checkpoint={weights}", highlight=False, soft_wrap=True
        )
