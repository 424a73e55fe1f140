"""`vgdistill eval`: Acc@0.5 / Acc@0.75 / mIoU per split of a run or checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import (
    RunOrCheckpoint,
    SetOption,
    check_json_out,
    console,
    err_console,
    friendly,
    write_json_out,
)
from vgdistill.errors import VGError


@friendly
def command(
    run_or_ckpt: RunOrCheckpoint,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Prepared dataset folder. Default: the recipe's data.path."),
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option("--split", help="Split to evaluate; repeatable. Default: eval.splits."),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Also write the results to this JSON file; '-' prints them to stdout "
            "instead of the table.",
        ),
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
    overrides: SetOption = None,
) -> None:
    """Evaluate a checkpoint: per split Acc@0.5, Acc@0.75, mean IoU, count and speed.

    Boxes are scored under eval.protocol: "transvg" (default; the reference's IoU in the
    padded, normalised square, comparable with the papers) or "pixels" (original image
    pixels), e.g. --set eval.protocol=pixels. --set changes any key of the checkpoint's recipe
    that does not change the model. Runs unchanged under
    `accelerate launch --num_processes N -m vgdistill eval ...` (counts stay exact).
    Given a run folder, writes eval.json (and refreshes curves.png) there.
    """
    from vgdistill.evaluation.evaluate import CONTROLS

    if control is not None and control not in CONTROLS:
        raise VGError(f"--control {control!r} is not one of: {', '.join(CONTROLS)}")
    if not run_or_ckpt.exists():
        raise VGError(f"checkpoint or run folder not found: {run_or_ckpt}")
    check_json_out(json_out)  # before the evaluation, not after it

    from vgdistill.evaluation.evaluate import evaluate_checkpoint
    from vgdistill.report.tables import results_table

    record = evaluate_checkpoint(
        run_or_ckpt,
        data,
        split,
        control,
        batch_size,
        overrides=overrides,
    )
    if record is None:  # not the main process
        return
    if not write_json_out(json_out, record):
        title = f"{run_or_ckpt} on {record['data']} ({record['protocol']} protocol)"
        console.print(results_table(record["results"], title=title))
    if record.get("not_saved"):  # a read-only run folder: results shown, not recorded
        err_console.print(f"warning: {record['not_saved']}", highlight=False, markup=False)
