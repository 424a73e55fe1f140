"""Atomic writes of files and folders, and an exclusive lock for an output folder.

A reader (or a later command) never sees half of something: files are written to a temp
name beside the target and renamed; folders are built beside the target and swapped in.
Outputs get the modes the umask asks for (0644 / 0755 under umask 022), a write that fills
the disk becomes one DiskFullError with its unfinished file removed, and the command that
holds a folder's lock removes the temporaries killed runs left in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vgdistill.errors import VGError, disk_full_error, human_bytes, is_disk_full

log = logging.getLogger("vgdistill")

# The lock of an output folder whose own parent cannot be written lives inside the folder.
LOCK_INSIDE = ".vgdistill.lock"


def umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _real(path: str | Path) -> Path:
    """`path` with symlinks resolved: a write through a link lands where the link points."""
    return Path(os.path.realpath(path))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder + fsync + rename)."""
    path = _real(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 whatever the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = is_disk_full(e, path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise disk_full_error(path.parent, len(data)) from e
        raise
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2() -> object | None:
    """libc's renameat2 on Linux (glibc >= 2.28), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or filesystem can't."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def recover(target: str | Path) -> bool:
    """Put back `target` if a replacement was killed between its two renames; True if it did.

    (Only the fallback swap, used where an atomic exchange is unavailable, has that moment.)
    """
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if target.exists() or not old.is_dir():
        return False
    os.replace(old, target)
    _fsync_dir(target.parent)
    return True


def finish_files(folder: Path) -> None:
    """Give a freshly written folder tree the umask's modes and fsync its files.

    mkdtemp makes 0700 and some writers (safetensors) 0600 whatever the umask says; the
    outputs are meant to be as readable as anything else the user creates.
    """
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):  # a chmod would change what the link points at
                continue
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def build_dir(target: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh temp folder beside `target`; on success it replaces `target` whole.

    On any error (or a kill) the temp folder is removed or left under a dot-name that no
    command reads, and the previous `target`, if any, is untouched. The old and new folders
    are exchanged in one step where the OS allows (Linux), so a reader never finds `target`
    missing; elsewhere two renames are used, and a kill between them is undone by `recover`.
    A full disk raises DiskFullError (`needed`: the bytes the folder takes, when known).
    """
    target = _real(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        finish_files(tmp)
        if target.is_dir() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous version
            return
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        full = is_disk_full(e, target.parent)  # before the removal frees the space again
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(e, VGError):
            raise disk_full_error(target.parent, needed) from e
        raise


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write(folder: Path) -> bool:
    """Whether files can be created in `folder` (permissions and read-only mounts alike)."""
    return os.access(folder, os.W_OK | os.X_OK)


def _why_not(folder: Path) -> str:
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    return "is not writable (permission denied)"


def _check_place(place: Path, what: str, shown: Path) -> None:
    """VGError unless `place` (where `shown` will be written) is a folder we can write."""
    if not place.is_dir():
        raise VGError(f"{what} {shown}: {place} is a file, not a folder; choose another path")
    if not _can_write(place):
        raise VGError(
            f"cannot write {what} {shown}: {place} {_why_not(place)}; choose another {what}"
        )


def check_writable(folder: str | Path, what: str = "--out", whole: bool = False) -> None:
    """Refuse (VGError, exit 2) an output folder that cannot be written, before any work.

    The folder itself must be writable when it exists, else the nearest existing folder
    above it (where it will be created). `whole`: the folder is built beside itself and
    swapped in (atomic.build_dir), so its parent must be writable too. A path that exists
    but is not a folder is refused as well.
    """
    folder = Path(folder)
    real = _real(folder)
    if real.exists() and not real.is_dir():
        raise VGError(f"{what} {folder} exists and is not a folder; choose another path")
    place = real.parent if whole or not real.exists() else real
    _check_place(_nearest_existing(place), what, folder)


def check_file_out(path: str | Path, what: str = "--out") -> None:
    """Refuse (VGError) an output file that is a folder or whose folder cannot be written
    (the file is replaced by a rename, so its folder must be writable even when it exists)."""
    path = Path(path)
    real = _real(path)
    if real.is_dir():
        raise VGError(f"{what} {path} is a folder; give a file name")
    _check_place(_nearest_existing(real.parent), what, path)


def unwritable_reason(exc: BaseException) -> str | None:
    """Why a write failed when the place cannot take it (read-only, no permission, full
    disk), for a caller that can go on without that file; None for any other failure."""
    if is_disk_full(exc):
        return "no space left on the disk"
    if isinstance(exc, OSError):
        if exc.errno == errno.EROFS:
            return "read-only file system"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
    return None


# Temporaries a killed command leaves: write_bytes' `.NAME.xxxxxxxx.tmp`, build_dir's
# `.NAME.xxxxxxxx.partial`, prepare's `.NAME.cache.xxxxxxxx`, discard's `.NAME.deleting`,
# and a training state's `.step-N.partial` (tempfile's names end in 8 of [a-z0-9_]).
_RAND = r"[a-z0-9_]{8}"
_STALE = re.compile(rf"^\..+\.(?:{_RAND}\.(?:tmp|partial)|cache\.{_RAND}|deleting|partial)$")


def _stale_beside(real: Path) -> list[Path]:
    name = re.escape(real.name)
    pattern = re.compile(rf"^\.{name}\.(?:{_RAND}\.(?:tmp|partial)|cache\.{_RAND}|deleting)$")
    with contextlib.suppress(OSError):
        return [p for p in real.parent.iterdir() if pattern.match(p.name)]
    return []


def _stale_inside(folder: Path) -> list[Path]:
    """Temporaries of killed writes directly inside `folder` (none when it is missing)."""
    with contextlib.suppress(OSError):
        return [p for p in folder.iterdir() if _STALE.match(p.name)]
    return []


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
    return sum(_size(p) for p in path.iterdir())


def _remove_stale(paths: list[Path], owner: Path) -> None:
    """Delete temporaries a killed command left (the caller holds the lock of `owner`)."""
    if not paths:
        return
    freed = sum(_size(p) for p in paths)
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    log.info(
        "%s: removed %d leftover(s) of an interrupted command (%s): %s",
        owner,
        len(paths),
        human_bytes(freed),
        ", ".join(sorted(p.name for p in paths)[:4]) + (" ..." if len(paths) > 4 else ""),
    )


def _lock_file(real: Path) -> Path:
    """Beside the folder when its parent is writable, else inside the folder itself."""
    if _can_write(real.parent) or not real.is_dir():
        return real.with_name(f".{real.name}.lock")
    return real / LOCK_INSIDE


@contextlib.contextmanager
def exclusive(
    folder: str | Path,
    what: str = "another vgdistill process",
    whole: bool = False,
    subfolders: tuple[str, ...] = (),
) -> Iterator[None]:
    """Hold the exclusive lock of output folder `folder`; refuse if another process holds it.

    First checks the folder can be written (`check_writable`, `whole` as there). The lock is
    keyed on the real path, so a symlink and its target share it. Once held, the temporaries
    killed commands left beside the folder, inside it and inside its `subfolders` are
    removed, and a full disk met inside the block is a DiskFullError naming the folder.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    check_writable(folder, whole=whole)
    real = _real(folder)
    real.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(_lock_file(real), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise VGError(
            f"{folder} is being written by {what}; wait for it to finish or choose another --out"
        ) from None
    try:
        inside = [p for sub in ("", *subfolders) for p in _stale_inside(real / sub)]
        _remove_stale(_stale_beside(real) + inside, folder)
        yield
    except Exception as e:
        if is_disk_full(e) and not isinstance(e, VGError):
            raise disk_full_error(folder) from e
        raise
    finally:
        lock.release()
