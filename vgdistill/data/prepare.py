"""`vgdistill prepare`: read a source, clean its rows, write one self-contained cached dataset.

Output: a `datasets.DatasetDict` saved with `save_to_disk` (images embedded), one row per
expression (the columns: data/manifest.py `features`), plus `prepare.json` (source, arguments,
counts, fingerprint; data/manifest.py). The folder is built beside `--out` and swapped in only
when complete, under an exclusive lock, so neither an interrupted run nor two concurrent runs
leave a half dataset that later commands would trust. How rows are cleaned: data/cleaning.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__, atomic
from vgdistill.data.cleaning import (
    StorableImageCache,
    clean_expression,
    clip_box,
    image_key,
    objects_column,
)
from vgdistill.data.images import max_pixels_limit
from vgdistill.data.manifest import (
    DROP_REASONS,
    FORMAT_VERSION,
    MANIFEST,
    SplitCounts,
    features,
    fingerprint,
    load_prepared,
    load_split,
    read_manifest,
    source_args_dict,
)
from vgdistill.data.sources import RawRow, Source, SourceArgs, get_source
from vgdistill.errors import VGError

if TYPE_CHECKING:
    import datasets
    from rich.console import Console

_SHOW_PATHS = 5


@dataclass
class PrepareResult:
    """What `prepare` did: the folder, its manifest, and whether the cache was reused."""

    out: Path
    manifest: dict[str, Any]
    reused: bool
    seconds: float

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


def _guard_out(out: Path) -> None:
    """Refuse to replace a folder that is not a prepared dataset (it may hold user files)."""
    if out.exists() and not out.is_dir():
        raise VGError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise VGError(
            f"--out {out} exists and is not a vgdistill dataset (no {MANIFEST}); "
            "choose a new or empty folder so nothing of yours is replaced"
        )


def _cached(out: Path, fp: str) -> dict[str, Any] | None:
    """The manifest of a complete dataset in `out` with fingerprint `fp`, else None."""
    if not (out / MANIFEST).is_file() or not (out / "dataset_dict.json").is_file():
        return None
    try:
        manifest = read_manifest(out)
    except VGError:
        return None
    return manifest if manifest.get("fingerprint") == fp else None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' own tqdm bars while we show ours."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


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


def _list_examples(paths: list[str]) -> str:
    """The first few paths, and how many more."""
    shown = ", ".join(paths[:_SHOW_PATHS])
    more = f" and {len(paths) - _SHOW_PATHS} more" if len(paths) > _SHOW_PATHS else ""
    return shown + more


def prepare(
    source_name: str,
    args: SourceArgs,
    out: str | Path,
    *,
    force: bool = False,
    skip_missing: bool = False,
    max_pixels: int | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Build (or reuse) the prepared dataset of `source_name` in `out`; see the module doc."""
    start = time.perf_counter()
    source = get_source(source_name)
    out = Path(out).expanduser().absolute()
    limit = max_pixels_limit(max_pixels)
    inputs = source.inputs(args)  # validates the arguments before anything is read
    options = {"skip_missing": skip_missing, "max_pixels": limit}
    fp = fingerprint(source, args, inputs, options)
    _guard_out(out)
    if not force and (manifest := _cached(out, fp)) is not None:
        return PrepareResult(out, manifest, reused=True, seconds=time.perf_counter() - start)

    with atomic.exclusive(out, what="another `vgdistill prepare`"):
        # Another run may have finished this very dataset while we waited for nothing.
        if not force and (manifest := _cached(out, fp)) is not None:
            return PrepareResult(out, manifest, reused=True, seconds=time.perf_counter() - start)
        _guard_out(out)
        with _progress(console, progress) as bar, _quiet_datasets():
            manifest = _build(source, args, out, fp, options, skip_missing, limit, bar)
    seconds = time.perf_counter() - start
    return PrepareResult(out, manifest, reused=False, seconds=seconds)


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
            f"{_list_examples(sorted(missing))}; check --images, or pass --skip-missing to "
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


def _row_generator(
    source_name: str,
    counts: dict[str, SplitCounts],
    by_split: dict[str, list[_Candidate]],
    cache: StorableImageCache,
    advance: Callable[[], None],
) -> Callable[[str], Iterator[dict[str, Any]]]:
    """generate(split): a split's cleaned rows, each image and box checked, repeats dropped,
    every decision counted in `counts`."""
    seen: set[tuple[Any, ...]] = set()

    def generate(split: str) -> Iterator[dict[str, Any]]:
        c = counts[split]
        for cand in by_split[split]:
            advance()
            stored = cache.get(cand.key, cand.row.image)
            if stored is None:
                c.dropped["unreadable image"] += 1
                continue
            box, reason, clipped = clip_box(cand.row.bbox_xyxy, stored.width, stored.height)
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
            yield {
                "image": {"bytes": stored.data, "path": None},
                "expression": cand.expression,
                "bbox": list(box),
                "image_id": cand.row.image_id,
                "ref_id": cand.row.ref_id,
                "split": split,
                "source": source_name,
                "width": stored.width,
                "height": stored.height,
                "objects": objects_column(cand.row.objects, stored.width, stored.height),
            }

    return generate


def _write_splits(
    generate: Callable[[str], Iterator[dict[str, Any]]],
    counts: dict[str, SplitCounts],
    fp: str,
    cache_dir: Path,
) -> dict[str, datasets.Dataset]:
    """One Dataset per split, written through `generate` (an empty split stays, empty)."""
    import datasets

    feats = features()
    splits = {}
    for split in counts:
        try:
            splits[split] = datasets.Dataset.from_generator(
                generate,
                features=feats,
                cache_dir=str(cache_dir),
                gen_kwargs={"split": split},
                fingerprint=f"{fp}-{split}",
                split=datasets.NamedSplit(split),
            )
        except ValueError:
            # datasets refuses a generator that yields nothing; keep the split, empty.
            if counts[split].kept:
                raise
            splits[split] = datasets.Dataset.from_dict(
                {k: [] for k in feats}, features=feats, split=datasets.NamedSplit(split)
            )
    return splits


def _build(
    source: Source,
    args: SourceArgs,
    out: Path,
    fp: str,
    options: dict[str, Any],
    skip_missing: bool,
    limit: int,
    bar: Any,
) -> dict[str, Any]:
    """Read, clean and write the dataset into `out` (swapped in whole); return its manifest."""
    import datasets

    rows = _read_rows(source, args, bar)
    missing = _missing_images(source, args, rows, skip_missing)
    counts, by_split = _candidates(rows, missing)
    cache = StorableImageCache(limit)
    task = bar.add_task("checking and writing images", total=sum(map(len, by_split.values())))
    generate = _row_generator(source.name, counts, by_split, cache, lambda: bar.advance(task))
    cache_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.cache.", dir=out.parent))
    try:
        splits = _write_splits(generate, counts, fp, cache_dir)
        unreadable = sorted(cache.errors.values())
        if unreadable and not skip_missing:
            raise VGError(
                f"{len(unreadable)} images could not be decoded, e.g. "
                f"{'; '.join(unreadable[:3])}; fix or remove them, or pass --skip-missing "
                "to drop their rows"
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "vgdistill_version": __version__,
            "source": source.name,
            "args": source_args_dict(source, args),
            "options": options,
            "counts": {s: c.to_dict() for s, c in counts.items()},
            "fingerprint": fp,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "images_reencoded": cache.reencoded,
            "missing_examples": sorted(missing)[:_SHOW_PATHS],
            "unreadable_examples": unreadable[:_SHOW_PATHS],
        }
        with atomic.build_dir(out) as tmp:
            datasets.DatasetDict(splits).save_to_disk(str(tmp))
            atomic.write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return manifest
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


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
