"""`vgdistill import transvg` (being built)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Convert checkpoints of other codebases.")
