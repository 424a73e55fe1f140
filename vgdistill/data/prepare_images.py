"""prepare's image pass: each distinct image checked once and written once, into the image table.

Checking an image (decoding it, choosing its frame, re-encoding the few that need it) is the
costly part of `prepare`; with `--workers N` it runs in N processes, a few small batches of
images queued per process, so memory stays bounded whatever the dataset's size. Results come
back in order, so the table (and the whole folder) is the same for any worker count.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vgdistill.data.cleaning import StorableImageCache
from vgdistill.data.image_table import file_stat
from vgdistill.data.images import StoredImage
from vgdistill.data.manifest import IMAGES, image_features
from vgdistill.data.store import TableWriter

# Images per batch handed to a worker process, and batches queued per process: enough to keep
# each busy, few enough that at most a few dozen images are in memory at once.
CHUNK = 8
QUEUED = 2

# An image's identity in prepare: its key (path or bytes hash) and the size the source gives
# for it (the frame it is kept in depends on that size).
ImageId = tuple[str, tuple[int, int] | None]
Outcome = tuple[StoredImage | str, tuple[int | None, int | None]]


@dataclass(frozen=True)
class ImageTask:
    """One distinct image to check: its identity, where it is, the first row's image_id."""

    key: str
    image: str | bytes
    size: tuple[int, int] | None
    image_id: str


@dataclass(frozen=True)
class Placed:
    """An image written to the table: its row there and the size it decodes to."""

    index: int
    width: int
    height: int


@dataclass
class ImagePass:
    """What the image pass did: each image's place in the table or its drop reason, the
    merged check records (unreadable, size mismatches, EXIF) and the dropped image files."""

    placed: dict[ImageId, Placed | str]
    checks: StorableImageCache
    dropped_files: list[list[str | int | None]] = field(default_factory=list)


def _check(
    tasks: list[ImageTask], max_pixels: int, frame: str
) -> tuple[list[Outcome], StorableImageCache]:
    """Check a batch of images (in a worker process): each stored image or drop reason, with
    its file's (size, mtime) taken before reading it; and this batch's check records."""
    checks = StorableImageCache(max_pixels, keep=0, frame=frame)
    outcomes = []
    for t in tasks:
        stat = file_stat(t.image) if isinstance(t.image, str) else (None, None)
        outcomes.append((checks.get(t.key, t.image, t.size), stat))
    return outcomes, checks


def _checked(
    tasks: list[ImageTask], max_pixels: int, frame: str, workers: int
) -> Iterator[tuple[list[ImageTask], list[Outcome], StorableImageCache]]:
    """Every batch of `tasks` with its outcomes, in order, checked in `workers` processes."""
    chunks = (tasks[i : i + CHUNK] for i in range(0, len(tasks), CHUNK))
    if workers <= 1:
        for chunk in chunks:
            yield chunk, *_check(chunk, max_pixels, frame)
        return
    # spawn: the parent holds threads (arrow, the progress bar) that a fork would copy mid-use.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        queue: deque[tuple[list[ImageTask], Future]] = deque()
        for chunk in chunks:
            queue.append((chunk, pool.submit(_check, chunk, max_pixels, frame)))
            if len(queue) >= QUEUED * workers:
                done, future = queue.popleft()
                yield done, *future.result()
        while queue:
            done, future = queue.popleft()
            yield done, *future.result()


def write_image_table(
    folder: Path,
    tasks: list[ImageTask],
    fingerprint: str,
    max_pixels: int,
    frame: str,
    workers: int,
    advance: Callable[[], None],
) -> ImagePass:
    """Check every image of `tasks` and write the storable ones to `folder`'s image table."""
    writer = TableWriter(folder, IMAGES, image_features(), fingerprint)
    result = ImagePass({}, StorableImageCache(max_pixels, keep=0, frame=frame))
    for chunk, outcomes, checks in _checked(tasks, max_pixels, frame, workers):
        result.checks.merge(checks)
        for task, (stored, (size, mtime)) in zip(chunk, outcomes, strict=True):
            file = task.image if isinstance(task.image, str) else ""
            if isinstance(stored, str):  # the drop reason
                result.placed[task.key, task.size] = stored
                if file:
                    result.dropped_files.append([file, size, mtime])
            else:
                placed = Placed(writer.rows, stored.width, stored.height)
                result.placed[task.key, task.size] = placed
                row = {
                    "image": {"bytes": stored.data, "path": None},
                    "image_id": task.image_id,
                    "width": stored.width,
                    "height": stored.height,
                    "file": file,
                    # -1: no stat was taken (bytes, or a file that vanished meanwhile).
                    "file_size": -1 if size is None else size,
                    "file_mtime_ns": -1 if mtime is None else mtime,
                }
                writer.write(row, nbytes=len(stored.data))
            advance()
    writer.close()
    return result
