"""`vgdistill eval`: Acc@0.5 / Acc@0.75 / mIoU per split of a run or checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import console, friendly
from vgdistill.errors import VGError


def is_run_folder(path: Path) -> bool:
    """A training run folder (as opposed to a bare checkpoint folder)."""
    return (
        path.is_dir()
        and not (path / "model.safetensors").exists()
        and any((path / name).exists() for name in ("recipe.toml", "best", "last"))
    )


@friendly
def command(
    run_or_ckpt: Annotated[
        Path,
        typer.Argument(help="Run folder (uses best/, else last/) or a checkpoint folder."),
    ],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Prepared dataset folder. Default: the recipe's data.path."),
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option("--split", help="Split to evaluate; repeatable. Default: eval.splits."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.")
    ] = None,
    control: Annotated[
        str | None,
        typer.Option(
            "--control",
            help="'shuffle': also evaluate with phrases shuffled across rows (a model that "
            "reads the language should drop towards a no-language baseline).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Batch size per process.")
    ] = None,
) -> None:
    """Evaluate a checkpoint: per split Acc@0.5, Acc@0.75, mean IoU, count and images/s.

    Boxes are compared in original image pixels. Runs unchanged under
    `accelerate launch --num_processes N -m vgdistill eval ...` (counts stay exact).
    Given a run folder, writes eval.json (and refreshes curves.png) there.
    """
    from vgdistill.evaluation.evaluate import CONTROLS

    if control is not None and control not in CONTROLS:
        raise VGError(f"--control {control!r} is not one of: {', '.join(CONTROLS)}")
    if not run_or_ckpt.exists():
        raise VGError(f"checkpoint or run folder not found: {run_or_ckpt}")

    from vgdistill.device import make_accelerator
    from vgdistill.evaluation.evaluate import evaluate, results_table
    from vgdistill.models.checkpoint import load_checkpoint
    from vgdistill.report.curves import plot_curves

    model, recipe = load_checkpoint(run_or_ckpt)
    accelerator = make_accelerator(recipe.train.mixed_precision)
    model.to(accelerator.device).eval()
    splits = list(split or recipe.eval.splits)
    data_path = data or Path(recipe.data.path)
    results = evaluate(
        model,
        recipe,
        splits,
        data_path=data_path,
        control=control,
        accelerator=accelerator,
        batch_size=batch_size,
    )
    if not accelerator.is_main_process:
        return
    record = {
        "checkpoint": str(run_or_ckpt),
        "data": str(data_path),
        "processes": accelerator.num_processes,
        "control": control,
        "results": results,
    }
    text = json.dumps(record, indent=2) + "\n"
    console.print(results_table(results, title=f"{run_or_ckpt} on {data_path}"))
    from vgdistill.atomic import write_text

    if json_out is not None:
        write_text(json_out, text)
    if is_run_folder(run_or_ckpt):
        write_text(run_or_ckpt / "eval.json", text)
        if (run_or_ckpt / "metrics.jsonl").exists():
            plot_curves(run_or_ckpt / "metrics.jsonl", run_or_ckpt / "curves.png")
