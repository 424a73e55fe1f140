"""Whether `vgdistill prepare` may reuse its output: an intact folder built from the same inputs.

The same source, arguments and input files (the fingerprint), every dataset file there with its
recorded size, and unchanged images (each image file's size and mtime) give "up to date";
anything else is rebuilt, saying why when the folder held an earlier build.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from vgdistill import atomic
from vgdistill.data.image_table import changed_files
from vgdistill.data.manifest import MANIFEST, damage, read_manifest
from vgdistill.errors import VGError

SHOW_PATHS = 5  # example paths named in a message or the manifest


def guard_out(out: Path) -> None:
    """Refuse to replace a folder that is not a prepared dataset (it may hold user files)."""
    if out.exists() and not out.is_dir():
        raise VGError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise VGError(
            f"--out {out} exists and is not a vgdistill dataset (no {MANIFEST}); "
            "choose a new or empty folder so nothing of yours is replaced"
        )


def reusable(out: Path, fp: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest of an intact dataset in `out` built from these very inputs, None), or
    (None, why not) when `out` holds a build of the same inputs that cannot be reused."""
    if not (out / MANIFEST).is_file():
        return None, None
    try:
        manifest = read_manifest(out)
    except VGError:
        return None, None
    if manifest.get("fingerprint") != fp:
        return None, None
    problem = damage(out, manifest)
    if problem is None:
        try:
            changed = changed_files(out, manifest)
        except Exception as e:  # an unreadable image table: damaged in a way sizes miss
            problem = f"its image table cannot be read: {e}"
    if problem is not None:
        return None, f"{out} is damaged ({problem}); rebuilding it"
    if changed:
        return None, (
            f"{len(changed)} image file(s) changed since {out} was built, e.g. "
            f"{list_examples(changed)}; rebuilding it"
        )
    return manifest, None


def remove_leftovers(out: Path) -> None:
    """Hold the output lock for a moment: atomic.exclusive then removes the build folders and
    image caches killed prepares left beside the up-to-date `out`."""
    # Locked by another command, or in a read-only place: the dataset is reused all the same
    # and the leftovers wait for a later run.
    with contextlib.suppress(VGError), atomic.exclusive(out, whole=True):
        pass


def list_examples(paths: list[str]) -> str:
    """The first few paths, and how many more."""
    shown = ", ".join(paths[:SHOW_PATHS])
    more = f" and {len(paths) - SHOW_PATHS} more" if len(paths) > SHOW_PATHS else ""
    return shown + more
