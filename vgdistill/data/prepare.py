"""`vgdistill prepare`: read a source, clean its rows, write one self-contained cached dataset.

Output: one `datasets.DatasetDict` folder (`datasets.load_from_disk` opens it; the tables:
data/manifest.py) holding an `images` table with each distinct image once and a table per split
with one row per expression referring to its image, plus `prepare.json` (source, arguments,
counts, fingerprint, every file with its size). Each image is checked once (in `--workers`
processes, data/prepare_images.py) and every table is streamed straight into its final arrow
files (data/store.py): nothing is written twice and memory does not grow with the dataset. The
folder is built beside `--out` and swapped in only when complete, under an exclusive lock, so
neither an interrupted run nor two concurrent runs leave a half dataset that later commands
would trust. How rows are cleaned: data/cleaning.py.

Reuse (an intact folder built from the same inputs is "up to date"): data/reuse.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__, atomic
from vgdistill.data.cleaning import clean_expression, clip_box, image_key, objects_column
from vgdistill.data.images import max_pixels_limit
from vgdistill.data.manifest import (
    DROP_REASONS,
    FORMAT_VERSION,
    IMAGES,
    MANIFEST,
    SplitCounts,
    features,
    fingerprint,
    load_prepared,
    load_split,
    read_manifest,
    source_args_dict,
)
from vgdistill.data.prepare_images import ImagePass, ImageTask, write_image_table
from vgdistill.data.reuse import SHOW_PATHS, guard_out, list_examples, remove_leftovers, reusable
from vgdistill.data.sources import RawRow, Source, SourceArgs, get_source
from vgdistill.data.store import TableWriter, file_sizes, write_dataset_dict
from vgdistill.errors import VGError

if TYPE_CHECKING:
    from rich.console import Console



@dataclass
class PrepareResult:
    """What `prepare` did: the folder, its manifest, whether the cache was reused, and why an
    earlier build in the folder was not (`note`)."""

    out: Path
    manifest: dict[str, Any]
    reused: bool
    seconds: float
    note: str | None = None

    @property
    def rows_read(self) -> int:
        """Rows the source yielded, all splits."""
        return sum(c["read"] for c in self.manifest["counts"].values())

    @property
    def rows_kept(self) -> int:
        """Rows written, all splits."""
        return sum(c["kept"] for c in self.manifest["counts"].values())


@dataclass
class _Candidate:
    """A row that passed the cheap checks, with its image key and cleaned phrase."""

    row: RawRow
    key: str
    expression: str


def _progress(console: Console | None, enabled: bool):  # noqa: ANN202 - rich type
    """The progress bars of one prepare run (transient; off when `enabled` is False)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )


def prepare(
    source_name: str | Source,
    args: SourceArgs,
    out: str | Path,
    *,
    force: bool = False,
    skip_missing: bool = False,
    max_pixels: int | None = None,
    workers: int = 1,
    console: Console | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Build (or reuse) the prepared dataset of `source_name` (a registered name, or a Source
    of rows made in memory) in `out`; see the module doc."""
    start = time.perf_counter()
    source = source_name if isinstance(source_name, Source) else get_source(source_name)
    out = Path(out).expanduser().absolute()
    limit = max_pixels_limit(max_pixels)
    if workers < 1:
        raise VGError(f"--workers must be at least 1, got {workers}")
    inputs = source.inputs(args)  # validates the arguments before anything is read
    # The worker count is not an option of the output: any count writes the same folder.
    options = {"skip_missing": skip_missing, "max_pixels": limit}
    fp = fingerprint(source, args, inputs, options)
    guard_out(out)
    note = None
    if not force:
        manifest, note = reusable(out, fp)
        if manifest is not None:
            remove_leftovers(out)
            return PrepareResult(out, manifest, reused=True, seconds=time.perf_counter() - start)

    with atomic.exclusive(out, what="another `vgdistill prepare`", whole=True):
        # Another run may have finished this very dataset while we waited for nothing.
        if not force:
            manifest, note = reusable(out, fp)
            if manifest is not None:
                seconds = time.perf_counter() - start
                return PrepareResult(out, manifest, reused=True, seconds=seconds)
        guard_out(out)
        with _progress(console, progress) as bar:
            manifest = _build(source, args, out, fp, options, workers, bar)
    seconds = time.perf_counter() - start
    return PrepareResult(out, manifest, reused=False, seconds=seconds, note=note)


def _read_rows(source: Source, args: SourceArgs, bar: Any) -> list[RawRow]:
    """Every row the source yields, with a progress count."""
    task = bar.add_task(f"reading {source.name}", total=None)
    rows = []
    for row in source.rows(args):
        rows.append(row)
        if len(rows) % 256 == 0:
            bar.update(task, completed=len(rows))
    bar.update(task, completed=len(rows), total=len(rows))
    return rows


def _missing_images(
    source: Source, args: SourceArgs, rows: list[RawRow], skip_missing: bool
) -> set[str]:
    """The image files that do not exist; VGError for no rows, a split asked for but absent,
    or (without skip_missing) any missing image."""
    if not rows:
        raise VGError(f"{source.name}: the input yielded no rows (check --root and --splits)")
    found = {r.split for r in rows}
    absent = [s for s in (args.splits or []) if s not in found]
    if absent:
        raise VGError(
            f"--splits names {', '.join(absent)}, but {source.name} has no rows for it; "
            f"splits read: {', '.join(sorted(found))}"
        )
    # Missing files are found up front (a stat per image) so the user hears at once, not
    # after every other image has been decoded.
    paths = sorted({r.image for r in rows if isinstance(r.image, str)})
    missing = {p for p in paths if not os.path.isfile(p)}
    if missing and not skip_missing:
        n_rows = sum(1 for r in rows if isinstance(r.image, str) and r.image in missing)
        raise VGError(
            f"{len(missing)} of {len(paths)} images are missing ({n_rows} rows), e.g. "
            f"{list_examples(sorted(missing))}; check --images, or pass --skip-missing to "
            "drop those rows"
        )
    return missing


def _candidates(
    rows: list[RawRow], missing: set[str]
) -> tuple[dict[str, SplitCounts], dict[str, list[_Candidate]]]:
    """Per split: the counts so far and the rows left after the phrase and missing-file checks."""
    counts: dict[str, SplitCounts] = {}
    by_split: dict[str, list[_Candidate]] = {}
    for row in rows:
        c = counts.setdefault(row.split, SplitCounts())
        by_split.setdefault(row.split, [])
        c.read += 1
        expression = clean_expression(row.expression)
        if not expression:
            c.dropped["empty phrase"] += 1
            continue
        if isinstance(row.image, str) and row.image in missing:
            c.dropped["missing image"] += 1
            continue
        by_split[row.split].append(_Candidate(row, image_key(row.image), expression))
    return counts, by_split


def _image_tasks(by_split: dict[str, list[_Candidate]]) -> list[ImageTask]:
    """Each distinct image of the candidates once, in order of first use."""
    tasks: dict[tuple[str, tuple[int, int] | None], ImageTask] = {}
    for cands in by_split.values():
        for c in cands:
            if (c.key, c.row.image_size) not in tasks:
                task = ImageTask(c.key, c.row.image, c.row.image_size, c.row.image_id)
                tasks[c.key, c.row.image_size] = task
    return list(tasks.values())


def _write_rows(
    folder: Path,
    source_name: str,
    by_split: dict[str, list[_Candidate]],
    counts: dict[str, SplitCounts],
    images: ImagePass,
    fp: str,
) -> None:
    """Write each split's table: every row's image and box checked, repeats dropped, every
    decision counted in `counts` (an empty split stays, empty)."""
    feats = features()
    seen: set[tuple[Any, ...]] = set()
    for split, cands in by_split.items():
        writer = TableWriter(folder, split, feats, fp)
        c = counts[split]
        for cand in cands:
            placed = images.placed[cand.key, cand.row.image_size]
            if isinstance(placed, str):  # the drop reason
                c.dropped[placed] += 1
                continue
            box, reason, clipped = clip_box(cand.row.bbox_xyxy, placed.width, placed.height)
            if box is None:
                c.dropped[reason or "degenerate box"] += 1
                continue
            dup_key = (split, cand.key, cand.expression.lower(), tuple(round(v, 1) for v in box))
            if dup_key in seen:
                c.dropped["duplicate"] += 1
                continue
            seen.add(dup_key)
            c.clipped += clipped
            c.kept += 1
            row = {
                "image_index": placed.index,
                "expression": cand.expression,
                "bbox": list(box),
                "image_id": cand.row.image_id,
                "ref_id": cand.row.ref_id,
                "split": split,
                "source": source_name,
                "width": placed.width,
                "height": placed.height,
                "objects": objects_column(cand.row.objects, placed.width, placed.height),
            }
            writer.write(row)
        writer.close()


def _build(
    source: Source,
    args: SourceArgs,
    out: Path,
    fp: str,
    options: dict[str, Any],
    workers: int,
    bar: Any,
) -> dict[str, Any]:
    """Read, clean and write the dataset into `out` (swapped in whole); return its manifest."""
    skip_missing, limit = options["skip_missing"], options["max_pixels"]
    rows = _read_rows(source, args, bar)
    missing = _missing_images(source, args, rows, skip_missing)
    counts, by_split = _candidates(rows, missing)
    if IMAGES in counts:
        raise VGError(
            f"{source.name} has a split named {IMAGES!r}, the name a prepared dataset keeps "
            "for its image table; leave it out with --splits"
        )
    tasks = _image_tasks(by_split)
    task = bar.add_task("checking and writing images", total=len(tasks))
    with atomic.build_dir(out) as tmp:
        images = write_image_table(
            tmp, tasks, fp, limit, args.exif_frame, workers, lambda: bar.advance(task)
        )
        unreadable = sorted(images.checks.errors.values())
        if unreadable and not skip_missing:
            raise VGError(
                f"{len(unreadable)} images could not be decoded, e.g. "
                f"{'; '.join(unreadable[:3])}; fix or remove them, or pass --skip-missing "
                "to drop their rows"
            )
        _write_rows(tmp, source.name, by_split, counts, images, fp)
        write_dataset_dict(tmp, [*counts, IMAGES])
        manifest = {
            "format_version": FORMAT_VERSION,
            "vgdistill_version": __version__,
            "source": source.name,
            "args": source_args_dict(source, args),
            "options": options,
            "counts": {s: c.to_dict() for s, c in counts.items()},
            "fingerprint": fp,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "images": sum(not isinstance(p, str) for p in images.placed.values()),
            "images_reencoded": images.checks.reencoded,
            "exif": images.checks.exif_report(),
            "size_mismatch_examples": sorted(images.checks.mismatches.values())[:SHOW_PATHS],
            "missing_examples": sorted(missing)[:SHOW_PATHS],
            "unreadable_examples": unreadable[:SHOW_PATHS],
            # Every file with its size (a damaged folder is rebuilt, not trusted), and the
            # image files whose rows were dropped (if one appears or changes, rebuild).
            "files": file_sizes(tmp),
            "dropped_files": [[p, None, None] for p in sorted(missing)] + images.dropped_files,
        }
        atomic.write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


# The manifest names are re-exported: callers may import them from here or from data.manifest.
__all__ = [
    "DROP_REASONS",
    "FORMAT_VERSION",
    "MANIFEST",
    "PrepareResult",
    "SplitCounts",
    "clip_box",
    "features",
    "fingerprint",
    "load_prepared",
    "load_split",
    "prepare",
    "read_manifest",
]
