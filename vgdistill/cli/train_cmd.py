"""`vgdistill train`: train a recipe into a run folder, resumable, on 1..N processes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import SetOption, console, friendly, out_option


@friendly
def command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe: a shipped name (e.g. refcoco/r50) or a TOML file.")
    ],
    overrides: SetOption = None,
    out: Annotated[
        Path | None,
        out_option("Run folder. Default: runs/NAME (refcoco/r50 -> refcoco-r50; my.toml -> my)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its newest saved state (mid-epoch); "
            "start it if it has none yet. A finished run trains on when train.epochs "
            "(or train.max_steps) was raised.",
        ),
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start from the weights of this checkpoint or run folder (e.g. one written "
            "by `vgdistill import transvg`): sets model.init_from.",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show the live progress display.")
    ] = True,
) -> None:
    """Train a recipe: checkpoints (best/, last/, state/), metrics.jsonl, curves.png.

    The same command runs on several GPUs or machines under
    `accelerate launch --num_processes N -m vgdistill train RECIPE ...`.
    Ctrl-C, SIGTERM and SIGHUP save a resumable state first; continue with --resume.
    When stderr is not a terminal (a batch job), a plain line is logged every
    train.log_every steps instead of the live bar.
    """
    from accelerate import PartialState

    from vgdistill.recipe import load_recipe
    from vgdistill.recipe.shipped import run_name
    from vgdistill.training.student import train

    overrides = list(overrides or [])
    if init_from is not None:
        overrides.append(f"model.init_from={json.dumps(str(init_from))}")
    resolved = load_recipe(recipe, overrides)
    out = out or Path("runs") / run_name(recipe)
    hint = ["vgdistill", "train", str(recipe), "--out", str(out), "--resume"]
    for item in overrides:
        hint += ["--set", item]
    summary = train(
        resolved, out, resume=resume, show_progress=progress, command_hint=shlex.join(hint)
    )
    if PartialState().is_main_process:
        best = summary.get("best") or {}
        acc = best.get("acc50", -1)
        score = f"best val Acc@0.5 {100 * acc:.2f} (step {best.get('step')})" if acc >= 0 else ""
        console.print(f"[green]done[/] {out}: {summary.get('step')} steps; {score}")
