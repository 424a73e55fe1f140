"""User-facing errors: one line, exit code 2, never a traceback."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from pathlib import Path


class VGError(Exception):
    """A problem with the user's input that they can fix; the CLI prints it as one line."""

    exit_code = 2


class NonFiniteLossError(VGError):
    """Training produced a NaN or infinite loss."""


class DiskFullError(VGError):
    """A write stopped because the disk (or the user's quota) is full; the partial output was
    removed and everything written before it is intact."""


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries that drop the errno say it (Rust's io::Error in safetensors, Arrow's C++).
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
# torch's zip writer reports a short write with no errno at all; it is a full disk when the
# disk it wrote to is (nearly) full at that moment.
_SHORT_WRITE_TEXT = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
_NEARLY_FULL = 64 * 2**20


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling (each once)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on the disk holding `folder` (its nearest existing parent); None if unknown."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, folder: str | Path | None = None) -> bool:
    """True when `exc` (or an exception behind it) says the disk or quota is full.

    With `folder` (where the failed write went), a short write that names no cause also
    counts when that disk has (almost) no space left.
    """
    for e in _chain(exc):
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        text = str(e)
        if any(t in text for t in _FULL_TEXT):
            return True
        if folder is not None and any(t in text for t in _SHORT_WRITE_TEXT):
            free = free_bytes(folder)
            if free is not None and free < _NEARLY_FULL:
                return True
    return False


def full_path(exc: BaseException) -> Path | None:
    """The file or folder a disk-full OSError names, if any does."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS and e.filename:
            return Path(str(e.filename)).parent
    return None


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024, one decimal)."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TB"


def disk_full_error(folder: str | Path | None, needed: int | None = None) -> DiskFullError:
    """The one-line error for a write into `folder` that ran out of space."""
    where = f"the disk holding {folder}" if folder is not None else "the output disk"
    free = free_bytes(folder) if folder is not None else None
    sizes = []
    if needed:
        sizes.append(f"this write needs about {human_bytes(needed)}")
    if free is not None:
        sizes.append(f"{human_bytes(free)} free")
    shown = f" ({', '.join(sizes)})" if sizes else ""
    return DiskFullError(
        f"no space left on {where}{shown}; the unfinished file was removed and nothing "
        "written before it was lost: free some space and run the command again (a training "
        "run continues with --resume)"
    )
