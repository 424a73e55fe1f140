"""Shared CLI plumbing: error handling, consoles, and the options several commands take."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from vgdistill.errors import VGError

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("vgdistill")

F = TypeVar("F", bound=Callable[..., Any])

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe key, e.g. --set train.lr=1e-4 (value read as TOML). Repeatable.",
    ),
]
RunOrCheckpoint = Annotated[
    Path, typer.Argument(help="Run folder (uses best/, else last/) or a checkpoint folder.")
]
ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show progress bars.")
]


def out_option(help: str) -> Any:
    """The `--out` / `-o` option, with the command's own help."""
    return typer.Option("--out", "-o", help=help)


def lr_option(section: str) -> Any:
    """The `--lr` option of a fitting stage (detector, teacher), overriding SECTION.lr."""
    help = f"Peak AdamW learning rate, warm-up then cosine (overrides {section}.lr)."
    return typer.Option(help=help)


class State:
    """Global options set by the app callback."""

    verbose: bool = False


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn user errors into one red line and exit code 2 (tracebacks only with --verbose)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except VGError as e:
            if State.verbose:
                traceback.print_exc()
            raise fail(str(e), e.exit_code) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            if State.verbose:
                traceback.print_exc()
            raise fail(f"{e.strerror}: {e.filename}") from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug, not bad input: still one line unless --verbose
            if State.verbose:
                traceback.print_exc()
            raise fail(
                f"internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)",
                1,
            ) from None

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool) -> None:
    """INFO logs by default, DEBUG with --verbose; library chatter stays quiet."""
    State.verbose = verbose
    # Other libraries (open_clip logs its model config at INFO) stay at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def flag_overrides(section: str, **flags: float | None) -> list[str]:
    """`--set` values for the flags a user gave (not None), each checked > 0 naming the flag;
    they come after --set, so the flags win (load_recipe checks the rest)."""
    overrides = []
    for name, value in flags.items():
        if value is None:
            continue
        if not value > 0:
            raise VGError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        overrides.append(f"{section}.{name}={value!r}")
    return overrides
