"""Shared CLI plumbing: error handling, consoles, and the options several commands take."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from vgdistill.errors import VGError, disk_full_error, full_path, is_disk_full

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


JSON_STDOUT = Path("-")  # `--json -`: print the JSON to stdout instead of writing a file


def check_json_out(json_out: Path | None) -> None:
    """Fail before any work when --json names a file that cannot be written ('-' is stdout)."""
    if json_out is not None and json_out != JSON_STDOUT:
        from vgdistill.atomic import check_file_out

        check_file_out(json_out, "--json")


def write_json_out(json_out: Path | None, record: dict[str, Any]) -> bool:
    """Write `record` to --json's file; True when it went to stdout ('-') instead of a table."""
    if json_out is None:
        return False
    text = json.dumps(record, indent=2)
    if json_out == JSON_STDOUT:
        typer.echo(text)
        return True
    from vgdistill.atomic import write_text

    write_text(json_out, text + "\n")
    return False


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
            if is_disk_full(e):  # errno 28 from a write no output folder wrapped
                raise fail(str(disk_full_error(full_path(e)))) from None
            if isinstance(e, OSError) and e.errno == errno.EROFS:
                raise fail(f"{e.strerror}: {e.filename}") from None
            raise fail(
                f"internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)",
                1,
            ) from None

    return wrapper  # type: ignore[return-value]


class _ClosedPipeSafe:
    """sys.stdout that, once its reader has gone (`vgdistill train ... | head`), discards
    further output instead of raising: the command goes on and keeps its exit status."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _discard(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        """Write, or drop the text once the reader has closed the pipe."""
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        """Flush, or drop the buffered text once the reader has closed the pipe."""
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()
            self._stream.flush()  # the buffer now drains into /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def tolerate_closed_stdout() -> None:
    """Make a closed stdout harmless for the rest of the process (console entry points)."""
    if sys.stdout is not None and not isinstance(sys.stdout, _ClosedPipeSafe):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stdout.fileno()  # only a real file descriptor can be redirected
            sys.stdout = _ClosedPipeSafe(sys.stdout)


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
