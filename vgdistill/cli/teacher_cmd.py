"""`vgdistill teacher`: fit a CLIP teacher on a prepared dataset (open_clip, contrastive)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vgdistill.cli.common import SetOption, console, err_console, friendly
from vgdistill.training.teacher import FitSettings  # no torch at import time

_DEFAULT = FitSettings()


def retrieval_table(report: dict[str, Any], split: str) -> Any:
    """A rich table of validation retrieval (R@1 before/after fitting, R@5, chance)."""
    from rich.table import Table

    before, after = report["metrics"]["before"], report["metrics"]["after"]
    table = Table(
        title=f"teacher retrieval on '{split}' "
        f"({int(after['images'])} images, {int(after['texts'])} distinct phrases)"
    )
    table.add_column("direction")
    table.add_column("R@1 before", justify="right")
    table.add_column("R@1", justify="right", style="bold")
    table.add_column("R@5", justify="right")
    table.add_column("chance R@1", justify="right")
    for key, name in (("i2t", "image -> phrase"), ("t2i", "phrase -> image")):
        table.add_row(
            name,
            f"{before[f'{key}_r1']:.3f}",
            f"{after[f'{key}_r1']:.3f}",
            f"{after[f'{key}_r5']:.3f}",
            f"{after[f'{key}_chance']:.3f}",
        )
    return table


@friendly
def command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe TOML: its data.* and distill.teacher* keys are used.")
    ],
    set_: SetOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (default: distill.teacher when it names a folder, "
            "else runs/teacher-NAME, NAME being the recipe file name).",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training pairs.")] = _DEFAULT.epochs,
    batch_size: Annotated[
        int, typer.Option(help="Pairs per contrastive batch (one phrase per image).")
    ] = _DEFAULT.batch_size,
    lr: Annotated[
        float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine).")
    ] = _DEFAULT.lr,
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
    from vgdistill.training.teacher import default_out, fit_teacher

    rec = load_recipe(recipe, set_ or [])
    target = out if out is not None else default_out(rec, recipe)
    settings = FitSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=rec.train.seed)
    report = fit_teacher(rec, target, settings, init=init, force=force, console=err_console)
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
