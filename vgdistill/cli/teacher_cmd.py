"""`vgdistill teacher`: fit a CLIP teacher on a prepared dataset (open_clip, contrastive)."""

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
        Path, typer.Argument(help="Recipe: its data.*, distill.teacher* and teacher.* keys.")
    ],
    set_: SetOption = None,
    out: Annotated[
        Path | None,
        out_option(
            "Output folder (default: distill.teacher when it names a folder, "
            "else runs/teacher-NAME, NAME being the recipe name)."
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the training pairs (overrides teacher.epochs).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Pairs per contrastive batch, one phrase per image (overrides teacher.batch_size)."
        ),
    ] = None,
    lr: Annotated[float | None, lr_option("teacher")] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Start from these open_clip weights: a local-dir folder or a weights file "
            "(default: distill.teacher_pretrained; '' = from scratch).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Refit even if --out holds a finished teacher.")
    ] = False,
) -> None:
    """Fit a CLIP teacher contrastively on the (image, phrase) pairs of a prepared dataset.

    open_clip's model classes and CLIP loss; each batch holds one phrase per image.

    Writes an open_clip local-dir folder that distill.teacher can point at (plus teacher.json).

    Prints image->phrase and phrase->image R@1 on data.val_split, with chance level.

    Examples:

      vgdistill teacher recipes/tiny.toml

      vgdistill teacher my.toml --init clip/ViT-B-16.safetensors --out runs/teacher-aerial
    """
    from vgdistill.recipe import load_recipe
    from vgdistill.report.tables import retrieval_table
    from vgdistill.training.teacher import default_out, fit_teacher

    overrides = flag_overrides("teacher", epochs=epochs, batch_size=batch_size, lr=lr)
    rec = load_recipe(recipe, [*(set_ or []), *overrides])
    target = out if out is not None else default_out(rec, recipe)
    report = fit_teacher(rec, target, init=init, force=force, console=err_console)
    if report["reused"]:
        err_console.print(f"{target} already holds this teacher (use --force to refit)")
    console.print(retrieval_table(report, rec.data.val_split))
    console.print(
        f"teacher: {report['teacher']}, {report['steps']} steps in {report['fit_s']:.0f}s "
        f"-> {target}",
        highlight=False,
        soft_wrap=True,
    )
    if Path(rec.distill.teacher).resolve() != Path(target).resolve():
        console.print(
            f"use it with: --set distill.teacher={target}", highlight=False, soft_wrap=True
        )
