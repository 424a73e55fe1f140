"""`vgdistill train`: train a recipe into a run folder, resumable, on 1..N processes."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import SetOption, console, friendly, out_option


@friendly
def command(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (e.g. recipes/tiny.toml).")],
    overrides: SetOption = None,
    out: Annotated[
        Path | None, out_option("Run folder. Default: runs/NAME, NAME being the recipe file name.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its newest saved state (mid-epoch); "
            "start it if it has none yet.",
        ),
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show the live progress display.")
    ] = True,
) -> None:
    """Train a recipe: checkpoints (best/, last/, state/), metrics.jsonl, curves.png.

    The same command runs on several GPUs or machines under
    `accelerate launch --num_processes N -m vgdistill train RECIPE ...`.
    Ctrl-C saves a resumable state first; continue with --resume.
    """
    from accelerate import PartialState

    from vgdistill.recipe import load_recipe
    from vgdistill.training.student import train

    resolved = load_recipe(recipe, overrides)
    out = out or Path("runs") / recipe.stem
    hint = ["vgdistill", "train", str(recipe), "--out", str(out), "--resume"]
    for item in overrides or []:
        hint += ["--set", item]
    summary = train(
        resolved, out, resume=resume, show_progress=progress, command_hint=shlex.join(hint)
    )
    if PartialState().is_main_process:
        best = summary.get("best") or {}
        acc = best.get("acc50", -1)
        score = f"best val Acc@0.5 {100 * acc:.2f} (step {best.get('step')})" if acc >= 0 else ""
        console.print(f"[green]done[/] {out}: {summary.get('step')} steps; {score}")
