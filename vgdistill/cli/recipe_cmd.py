"""`vgdistill recipe list|cp|show|check`: the shipped recipes, copying one to edit, what a
recipe resolves to, validating recipe files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import SetOption, console, friendly

app = typer.Typer(no_args_is_help=True, help="List, copy, inspect and validate recipes.")

RecipeArg = Annotated[
    str, typer.Argument(help="A shipped recipe name (see `vgdistill recipe list`) or a TOML file.")
]


@app.command("list")
@friendly
def list_() -> None:
    """List the shipped recipes: name and what each is.

    Every command that takes a recipe accepts these names, e.g. `vgdistill train refcoco/r50`.
    """
    from vgdistill.recipe.shipped import shipped_recipes
    from vgdistill.report.tables import recipes_table

    rows = [(r.name, r.description) for r in shipped_recipes().values()]
    console.print(recipes_table(rows))


@app.command("cp")
@friendly
def cp(
    name: Annotated[str, typer.Argument(help="Shipped recipe name, e.g. refcoco/r50.")],
    dest: Annotated[
        Path, typer.Argument(help="File to write, or an existing folder (NAME.toml goes there).")
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it exists.")] = False,
) -> None:
    """Copy a shipped recipe to edit it; the copy still resolves anywhere (its `extends`
    names a shipped recipe)."""
    from vgdistill.recipe.shipped import copy_recipe

    written = copy_recipe(name, dest, force=force)
    console.print(
        f"wrote {written}; train it with: vgdistill train {written}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("show")
@friendly
def show(recipe: RecipeArg, overrides: SetOption = None) -> None:
    """Print the resolved recipe (extends, preset and --set applied) as TOML."""
    from vgdistill.recipe import load_recipe, to_toml

    console.print(to_toml(load_recipe(recipe, overrides)), highlight=False, markup=False)


@app.command("check")
@friendly
def check(
    recipes: Annotated[
        list[str], typer.Argument(help="Recipe TOML files or shipped names to validate.")
    ],
) -> None:
    """Validate recipes; exits 2 at the first invalid one."""
    from vgdistill.recipe import load_recipe

    for recipe in recipes:
        load_recipe(recipe)
        console.print(f"[green]ok[/] {recipe}", highlight=False)
