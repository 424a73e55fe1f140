"""Folders that a fitting stage writes (`vgdistill teacher`, `vgdistill detector`).

Each holds a weights file and a JSON report whose "settings" say how it was made and whose
"complete" flag is written last. A later run with equal settings reuses the folder, one with
other settings is refused unless forced, and a folder that is not such an output is never
overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill.errors import VGError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


def read_report(folder: str | Path, report_file: str, weights_file: str) -> dict[str, Any] | None:
    """The report of a complete output folder, or None when there is none."""
    folder = Path(folder)
    path = folder / report_file
    if not path.is_file() or not (folder / weights_file).is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return report if isinstance(report, dict) and report.get("complete") else None


def reusable_report(
    out: Path,
    report_file: str,
    weights_file: str,
    settings: dict[str, Any],
    what: str,
    force: bool,
    marker: str = "",
) -> dict[str, Any] | None:
    """The finished report in `out` (with "reused": True) when it was made with `settings`;
    None when the stage must run and may write `out`.

    Raises VGError when `out` holds a finished `what` made with other settings (unless
    `force`), or holds files but neither the report nor `marker` (default: the weights file),
    so is not a `what` folder at all.
    """
    existing = read_report(out, report_file, weights_file)
    if existing is not None and not force:
        if existing.get("settings") != settings:
            raise VGError(
                f"{out} holds a {what} made with other settings; pass --force to make it "
                "again or choose another --out"
            )
        return {**existing, "reused": True}
    ours = existing is not None or (out / (marker or weights_file)).exists()
    if out.exists() and not ours and any(out.iterdir()):
        raise VGError(f"{out} exists and is not a {what} folder; choose another --out")
    return None


def fit_progress(title: str, console: Console, enabled: bool) -> Progress:
    """The transient progress bar of a fitting stage; its task needs a `loss` field."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(title),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )
