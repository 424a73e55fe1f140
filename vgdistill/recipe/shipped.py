"""The recipes that ship with vgdistill: where they live, their names, and finding a recipe by
path or by name.

A shipped recipe's name is its path under the recipes folder without `.toml`: `tiny`,
`refcoco/r50`. The folder is the checkout's top-level `recipes/`; a wheel carries the same
files as `vgdistill/recipes/` (setup.py maps one onto the other).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from vgdistill.errors import VGError

SUFFIX = ".toml"


def recipes_dir() -> Path:
    """The folder holding the shipped recipes (installed package, else the source checkout)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "recipes"
    # An editable install or a plain checkout has no vgdistill/recipes: the files sit beside
    # the package, in the top-level recipes/ folder the wheel's copy is made from.
    return installed if installed.is_dir() else package.parent / "recipes"


@dataclass(frozen=True)
class ShippedRecipe:
    """One shipped recipe: its name, file and one-line description."""

    name: str
    path: Path

    @property
    def description(self) -> str:
        """The first line of the file's opening comment."""
        for line in self.path.read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if not text.startswith("#"):
                return ""
            if text.lstrip("#").strip():
                return text.lstrip("#").strip()
        return ""


def shipped_recipes() -> dict[str, ShippedRecipe]:
    """Every shipped recipe by name, sorted (files starting with '.' are not recipes)."""
    root = recipes_dir()
    found = {}
    for path in sorted(root.rglob(f"*{SUFFIX}")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        name = rel.with_suffix("").as_posix()
        found[name] = ShippedRecipe(name, path)
    return found


def _key(name: str) -> str:
    """'refcoco\\r50.toml' -> 'refcoco/r50': the form shipped names are kept in."""
    return name.replace("\\", "/").removesuffix(SUFFIX)


def shipped_path(name: str) -> Path | None:
    """The file of the shipped recipe NAME ('refcoco/r50'; a '.toml' ending is allowed)."""
    recipe = shipped_recipes().get(_key(name))
    return recipe.path if recipe else None


def locate(recipe: str | Path, folder: Path | None = None) -> Path:
    """A recipe argument as a file: an existing path (relative to `folder` when given), else a
    shipped recipe of that name; VGError naming the closest shipped name otherwise."""
    path = Path(recipe) if folder is None else folder / recipe
    if path.is_file():
        return path
    shipped = shipped_path(str(recipe))
    if shipped is not None:
        return shipped
    names = list(shipped_recipes())
    close = difflib.get_close_matches(_key(str(recipe)), names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise VGError(
        f"recipe not found: {path}: not a file, nor a shipped recipe name{hint} "
        "(`vgdistill recipe list` shows them)"
    )


def run_name(recipe: str | Path) -> str:
    """A default run folder name for a recipe argument: 'refcoco-r50' for the shipped
    refcoco/r50, the file name without .toml for a file."""
    path = Path(recipe)
    if not path.is_file() and shipped_path(str(recipe)) is not None:
        return _key(str(recipe)).replace("/", "-")
    return path.stem


def copy_recipe(name: str, dest: Path, force: bool = False) -> Path:
    """Copy the shipped recipe NAME to `dest` (a file, or an existing folder to put
    NAME.toml in, '/' turned into '-'); returns the file written."""
    from vgdistill.atomic import check_file_out, write_text

    source = shipped_path(name)
    if source is None:
        locate(name)  # raises the not-found error with the closest shipped name
        raise VGError(f"{name} is a file, not a shipped recipe name (`vgdistill recipe list`)")
    if dest.is_dir():
        dest = dest / (_key(name).replace("/", "-") + SUFFIX)
    if dest.exists() and not force:
        raise VGError(f"{dest} exists; pass --force to replace it")
    check_file_out(dest, "DEST")  # a read-only place, or a path below a file: one line
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_text(dest, source.read_text(encoding="utf-8"))
    return dest
