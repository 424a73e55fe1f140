"""`vgdistill bench`: training / evaluation speed of a recipe on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import (
    SetOption,
    check_json_out,
    console,
    err_console,
    friendly,
    write_json_out,
)


@friendly
def command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe: a shipped name (e.g. r50) or a TOML file.")
    ],
    overrides: SetOption = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu or cuda (default: cuda when available)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", help="Batch size (default: train.batch_size)."),
    ] = None,
    eval_batch_size: Annotated[
        int | None,
        typer.Option(
            "--eval-batch-size",
            help="Evaluation batch (default: --batch-size if given, else eval.batch_size).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Steps per timed window.")] = 10,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed steps before each configuration.")
    ] = 3,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed windows per figure (the median is shown).")
    ] = 3,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Also write the figures to this JSON file; '-' prints them to stdout "
            "instead of the tables.",
        ),
    ] = None,
    no_data: Annotated[
        bool, typer.Option("--no-data", help="Skip the data pipeline measurement.")
    ] = False,
    data_path: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="A prepared dataset folder: measure the training loader on its train split "
            "(per core, uint8 images vs normalising in the loader) and evaluation on its val "
            "split (one visual pass per image vs one per expression) instead of the model "
            "steps.",
        ),
    ] = None,
    eval_rows: Annotated[
        int,
        typer.Option(
            "--eval-rows", help="With --data: evaluate the first images up to this many rows."
        ),
    ] = 256,
    plain: Annotated[
        bool,
        typer.Option(
            "--compare-plain/--no-compare-plain",
            help="Also time the plain path (every speed feature off), interleaved with the "
            "fast path.",
        ),
    ] = True,
    each: Annotated[
        bool,
        typer.Option(
            "--each", help="Also switch each speed feature off alone (its before/after figure)."
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="torch CPU threads (default: torch's choice)."),
    ] = None,
) -> None:
    """Measure a recipe's speed: data pipeline, train step (with and without the teacher),
    evaluation, peak memory, FLOPs per image and achieved TFLOP/s, fast path vs plain path.

    Builds everything with random weights (no downloads, no dataset needed): model shapes
    come from the recipe, the data figure from JPEGs generated in a temporary folder. With
    --data PATH it measures that prepared dataset's loader and evaluation instead.
    """
    from vgdistill.errors import VGError
    from vgdistill.report.bench import bench_tables, load_note
    from vgdistill.tools.bench import BenchOptions, bench_file

    if data_path is not None and no_data:
        raise VGError("--data PATH measures a dataset's loader; it cannot go with --no-data")
    check_json_out(json_out)  # before the measurements, not after them
    opts = BenchOptions(
        device=device,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
        data=not no_data,
        plain=plain,
        each=each,
        threads=threads,
        data_path=None if data_path is None else str(data_path),
        eval_rows=eval_rows,
    )
    with err_console.status("benchmarking") as status:
        result = bench_file(
            recipe, overrides, opts, progress=lambda msg: status.update(f"bench: {msg}")
        )
    to_stdout = write_json_out(json_out, result)
    if not to_stdout:
        for table in bench_tables(result):
            console.print(table)
    note = load_note(result)
    if note is not None:
        err_console.print(note)
    if json_out is not None and not to_stdout:
        console.print(f"wrote {json_out}")
