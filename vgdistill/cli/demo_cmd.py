"""`vgdistill demo`: the whole EpmVG method, offline, on the bundled synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import (
    ProgressOption,
    SetOption,
    console,
    err_console,
    friendly,
    out_option,
)


@friendly
def command(
    out: Annotated[Path, out_option("Folder for everything.")] = Path("runs/demo"),
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Recipe to run: a file or shipped name (default: demo; `vgdistill recipe cp "
            "demo my.toml` gives you a copy to edit)."
        ),
    ] = None,
    set_: SetOption = None,
    rows: Annotated[
        int | None,
        typer.Option(
            help="Rows of shapes data over all splits (default: 33,500, of which 32,000 train).",
            min=20,
        ),
    ] = None,
    progress: ProgressOption = True,
    stop_after: Annotated[
        str | None,
        typer.Option(
            help="End after this stage: prepare, detector, teacher, train, evaluate or predict "
            "(a later run without it continues from there)."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Redo every stage, replacing what an earlier demo left under --out (needed "
            "when an upgrade changed the demo's settings)."
        ),
    ] = False,
) -> None:
    """Prepare `shapes`, pretrain a detector, fit a CLIP teacher, train a distilled student,
    evaluate, predict.

    Runs offline on a laptop CPU in minutes. Re-running reuses every finished stage; a stage
    that was cut off continues where it stopped.

    Examples:

      vgdistill demo

      vgdistill demo --recipe demo_full --out runs/demo-full

      vgdistill demo --stop-after prepare     # only generate the data
    """
    from vgdistill.atomic import check_writable
    from vgdistill.report.tables import demo_table
    from vgdistill.tools.demo import DEMO_RECIPE, run_demo, stage_lines

    check_writable(out)  # every stage writes under --out
    report = run_demo(
        out,
        recipe or DEMO_RECIPE,
        set_ or [],
        console=err_console,
        progress=progress,
        rows=rows,
        force=force,
        stop_after=stop_after,
    )
    if report.stopped_after:
        console.print(
            f"stopped after {report.stopped_after} (--stop-after); "
            + "; ".join(stage_lines(report, lambda s: f"{s:.0f}s")),
            highlight=False,
            markup=False,
        )
        return
    console.print(demo_table(report.results, report.out))
    if report.detector:
        console.print(
            f"detector on val: {report.detector['found50']:.2f} of objects found at IoU 0.5, "
            f"category accuracy {report.detector['category_acc']:.2f}",
            highlight=False,
        )
    if report.teacher:
        console.print(
            f"teacher retrieval on val (R@1): image->phrase {report.teacher['i2t_r1']:.2f}, "
            f"phrase->image {report.teacher['t2i_r1']:.2f} "
            f"(chance {report.teacher['i2t_chance']:.3f})",
            highlight=False,
        )
    console.print("pictures: " + ", ".join(report.pictures), highlight=False)
    console.print("time: " + "; ".join(stage_lines(report, lambda s: f"{s:.0f}s")), highlight=False)
    console.print(
        f'next: vgdistill predict {report.student} IMAGE "the red circle"',
        highlight=False,
        markup=False,
    )
