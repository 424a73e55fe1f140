"""`vgdistill import transvg`: convert checkpoints of other codebases into vgdistill ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import SetOption, console, friendly, out_option

app = typer.Typer(no_args_is_help=True, help="Convert checkpoints of other codebases.")


@app.callback()
def _group() -> None:
    """Convert checkpoints of other codebases into vgdistill checkpoint folders."""


@app.command("transvg")
@friendly
def transvg(
    ckpt: Annotated[
        Path,
        typer.Argument(
            help="TransVG checkpoint (.pth from djiajunustc/TransVG, e.g. best_checkpoint.pth)."
        ),
    ],
    out: Annotated[Path, out_option("Checkpoint folder to write.")],
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Recipe for what the checkpoint does not fix (tokenizer, distillation, training); "
            "default: the built-in TransVG R-50 settings.",
        ),
    ] = None,
    set_: SetOption = None,
) -> None:
    """Convert a TransVG reference checkpoint into a vgdistill checkpoint (same boxes).

    The architecture is read from the checkpoint; the result evaluates with `vgdistill eval`
    and starts EpmVG training. The .pth is read with torch.load(weights_only=True): a file
    that carries code is refused, never run.
    """
    from vgdistill.atomic import exclusive
    from vgdistill.models.transvg_import import import_transvg
    from vgdistill.recipe import apply_overrides, from_dict, load_recipe

    if recipe is not None:
        rec = load_recipe(recipe, set_ or [])
    else:
        rec = from_dict(apply_overrides({}, set_ or [], "--set"), "--set")
    with exclusive(out, whole=True):  # the checkpoint folder is swapped in whole
        summary = import_transvg(ckpt, out, rec)
    console.print(
        f"[green]wrote[/] {out}: {summary['backbone']}, hidden {summary['hidden_dim']}, "
        f"{summary['enc_layers']} encoder + {summary['fusion_layers']} fusion layers, BERT layer "
        f"{summary['text_layer']}, image {summary['image_size']}, query {summary['max_query_len']} "
        f"({summary['mapped']} tensors mapped, {summary['skipped']} unused skipped; "
        f"distillation: {summary['distill_modality']})",
        highlight=False,
    )
