"""`vgdistill recipe show|check`: see what a recipe resolves to, validate recipe files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import SetOption, console, friendly

app = typer.Typer(no_args_is_help=True, help="Inspect and validate recipes.")


@app.command("show")
@friendly
def show(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: SetOption = None,
) -> None:
    """Print the resolved recipe (extends, preset and --set applied) as TOML."""
    from vgdistill.recipe import load_recipe, to_toml

    console.print(to_toml(load_recipe(recipe, overrides)), highlight=False, markup=False)


@app.command("check")
@friendly
def check(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe TOML files to validate.")],
) -> None:
    """Validate recipe files; exits 2 at the first invalid one."""
    from vgdistill.recipe import load_recipe

    for path in recipes:
        load_recipe(path)
        console.print(f"[green]ok[/] {path}")
