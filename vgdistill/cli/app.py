"""The `vgdistill` command: registers one module per subcommand.

Subcommand modules import torch and friends inside their functions, so `--help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from vgdistill import __version__
from vgdistill.cli import (
    ablate_cmd,
    bench_cmd,
    demo_cmd,
    detector_cmd,
    eval_cmd,
    import_cmd,
    predict_cmd,
    prepare_cmd,
    recipe_cmd,
    teacher_cmd,
    train_cmd,
)
from vgdistill.cli.common import setup_logging, tolerate_closed_stdout

app = typer.Typer(
    name="vgdistill",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help=(
        "Visual grounding with cross-modal distillation: a TransVG student trained with a "
        "frozen CLIP teacher (EpmVG).\n\n"
        "Typical flow: prepare -> train -> eval -> predict; `ablate` runs the paper's ablations; "
        "`demo` runs the whole chain on the bundled synthetic data."
    ),
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vgdistill {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logs and full tracebacks.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Global options."""
    setup_logging(verbose)


app.command("prepare")(prepare_cmd.command)
app.command("train")(train_cmd.command)
app.command("eval")(eval_cmd.command)
app.command("ablate")(ablate_cmd.command)
app.command("predict")(predict_cmd.command)
app.command("detector")(detector_cmd.command)
app.command("teacher")(teacher_cmd.command)
app.command("demo")(demo_cmd.command)
app.command("bench")(bench_cmd.command)
app.add_typer(recipe_cmd.app, name="recipe")
app.add_typer(import_cmd.app, name="import")


def main() -> None:
    """Console-script entry point."""
    tolerate_closed_stdout()  # `vgdistill train ... | head` keeps the run's exit status
    app()
