"""`vgdistill prepare`: read a source, clean its rows, write one self-contained cached dataset.

Output (see CONTRACTS.md): a `datasets.DatasetDict` saved with `save_to_disk` (images embedded),
one row per expression, plus `prepare.json` (source, arguments, counts, fingerprint). The folder
is built beside `--out` and swapped in only when complete, under an exclusive lock, so neither
an interrupted run nor two concurrent runs leave a half dataset that later commands would trust.

Cleaning, per split, every decision counted (nothing is dropped silently):
  empty phrase      -> dropped          missing image / unreadable image -> dropped (or an error)
  box partly outside the image -> clipped (kept, counted)
  box entirely outside -> dropped       box narrower or shorter than 1 px -> dropped (degenerate)
  same image + phrase + box twice in a split -> the repeat is dropped (duplicate)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__, atomic
from vgdistill.data.images import StoredImage, image_for_storage, max_pixels_limit
from vgdistill.data.sources import RawRow, Source, SourceArgs, get_source
from vgdistill.errors import VGError

if TYPE_CHECKING:
    import datasets
    from rich.console import Console
    from rich.table import Table

# 2: the `objects` column (every annotated object of the image, for `vgdistill detector`).
FORMAT_VERSION = 2
MANIFEST = "prepare.json"
DROP_REASONS = (
    "missing image",
    "unreadable image",
    "empty phrase",
    "degenerate box",
    "box outside image",
    "duplicate",
)
# A box edge further than this outside the image counts as clipped; smaller overhangs are the
# float rounding COCO boxes are known for (x + w = width + 0.01) and are clipped silently.
CLIP_TOLERANCE_PX = 1.0
MIN_BOX_PX = 1.0
_SHOW_PATHS = 5


def features() -> datasets.Features:
    """The datasets Features of a prepared split (the contract's columns)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "expression": datasets.Value("string"),
            "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
            "image_id": datasets.Value("string"),
            "ref_id": datasets.Value("string"),
            "split": datasets.Value("string"),
            "source": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            # Every annotated object of the image (empty when the source has none).
            "objects": datasets.Sequence(
                {
                    "category": datasets.Value("string"),
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                }
            ),
        }
    )


@dataclass
class SplitCounts:
    """What happened to the rows of one split."""

    read: int = 0
    kept: int = 0
    clipped: int = 0
    dropped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """The manifest form: every reason listed, zeros included."""
        return {
            "read": self.read,
            "kept": self.kept,
            "clipped": self.clipped,
            "dropped": {r: int(self.dropped.get(r, 0)) for r in DROP_REASONS},
        }


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


# ---------------------------------------------------------------------------------------------
# Manifest, fingerprint and loading


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def source_args_dict(source: Source, args: SourceArgs) -> dict[str, Any]:
    """The arguments this source reads, as plain JSON values (absolute paths)."""
    return {name: _jsonable(getattr(args, name)) for name in source.options}


def _stat(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [str(path), None, None]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(
    source: Source, args: SourceArgs, inputs: list[Path], options: dict[str, Any]
) -> str:
    """A hash of everything the output depends on: code version, source, arguments, inputs."""
    payload = {
        "format_version": FORMAT_VERSION,
        "vgdistill_version": __version__,
        "source": source.name,
        "args": source_args_dict(source, args),
        "options": options,
        "inputs": [_stat(Path(p)) for p in inputs],
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The prepare.json of a prepared folder; VGError when absent, unreadable or too new."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise VGError(f"{folder} does not exist: run `vgdistill prepare SOURCE --out {folder}`")
    if not folder.is_dir():
        raise VGError(f"{folder} is not a folder written by `vgdistill prepare`")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise VGError(
            f"{folder} has no {MANIFEST}: not a (complete) `vgdistill prepare` output; "
            "run prepare again with --out pointing there"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise VGError(f"{manifest_path}: unreadable manifest ({e}); run prepare --force") from None
    if not isinstance(manifest, dict):
        raise VGError(f"{manifest_path}: unreadable manifest; run prepare --force")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise VGError(f"{manifest_path}: no format_version; run prepare --force")
    if version > FORMAT_VERSION:
        raise VGError(
            f"{folder} was written by a newer vgdistill (format {version}, this one reads "
            f"<= {FORMAT_VERSION}); upgrade vgdistill or prepare it again"
        )
    return manifest


def load_prepared(path: str | Path) -> datasets.DatasetDict:
    """Open a prepared dataset (memory-mapped); VGError if missing, incomplete or too new."""
    import datasets

    folder = Path(path).expanduser()
    read_manifest(folder)
    if not (folder / "dataset_dict.json").is_file():
        raise VGError(f"{folder} is incomplete (no dataset_dict.json); run prepare --force")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise VGError(
            f"{folder}: cannot load the prepared dataset ({e}); run prepare --force"
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise VGError(f"{folder}: expected a DatasetDict; run prepare --force")
    return loaded


def load_split(path: str | Path, split: str) -> datasets.Dataset:
    """One non-empty split of a prepared dataset (clear errors for a missing dataset or split)."""
    dd = load_prepared(path)
    if split not in dd:
        raise VGError(
            f"split {split!r} not in {path} (splits: {', '.join(dd)}); "
            "check data.train_split / data.val_split"
        )
    if len(dd[split]) == 0:
        raise VGError(f"split {split!r} of {path} is empty")
    return dd[split]


# ---------------------------------------------------------------------------------------------
# Cleaning


def clean_expression(text: str) -> str:
    """Collapse whitespace; the phrase is otherwise kept as the source wrote it."""
    return " ".join(str(text).split())


def clip_box(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[tuple[float, float, float, float] | None, str | None, bool]:
    """(clipped box or None, drop reason or None, clipped?) for a box in a width x height image."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box) or x2 <= x1 or y2 <= y1:
        return None, "degenerate box", False
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return None, "box outside image", False
    cx1, cy1 = max(0.0, x1), max(0.0, y1)
    cx2, cy2 = min(float(width), x2), min(float(height), y2)
    moved = max(abs(cx1 - x1), abs(cy1 - y1), abs(cx2 - x2), abs(cy2 - y2))
    if cx2 - cx1 < MIN_BOX_PX or cy2 - cy1 < MIN_BOX_PX:
        return None, "degenerate box", False
    return (cx1, cy1, cx2, cy2), None, moved > CLIP_TOLERANCE_PX


def _objects(
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...], width: int, height: int
) -> dict[str, list[Any]]:
    """The objects column of one row: boxes clipped to the image, degenerate ones dropped."""
    kept: dict[str, list[Any]] = {"category": [], "bbox": []}
    for category, box in objects:
        clipped, _, _ = clip_box(box, width, height)
        if clipped is not None:
            kept["category"].append(category)
            kept["bbox"].append(list(clipped))
    return kept


def _image_key(image: str | bytes) -> str:
    if isinstance(image, bytes):
        return "sha1:" + hashlib.sha1(image).hexdigest()
    return image


class _ImageCache:
    """Validated images: each image is decoded once; the bytes of the last few are kept.

    Rows of one image usually come together, so a small LRU avoids reading or re-encoding the
    same file once per expression without holding a whole dataset of images in memory; an
    image already validated is only re-read (not decoded again) when it comes back later.
    """

    def __init__(self, max_pixels: int, keep: int = 64) -> None:
        self.max_pixels = max_pixels
        self.keep = keep
        self.errors: dict[str, str] = {}
        self.valid: dict[str, tuple[int, int, bool]] = {}  # key -> (width, height, re-encoded)
        self.recent: OrderedDict[str, StoredImage] = OrderedDict()

    @property
    def reencoded(self) -> int:
        """How many distinct images had to be re-encoded (rotated, CMYK, 16-bit, ...)."""
        return sum(r for _, _, r in self.valid.values())

    def get(self, key: str, image: str | bytes) -> StoredImage | None:
        """The storable image for `key`, or None when it cannot be decoded (error recorded)."""
        if key in self.errors:
            return None
        hit = self.recent.get(key)
        if hit is not None:
            self.recent.move_to_end(key)
            return hit
        known = self.valid.get(key)
        try:
            if known is not None and not known[2]:
                data = image if isinstance(image, bytes) else Path(image).read_bytes()
                stored = StoredImage(data, known[0], known[1], reencoded=False)
            else:
                name = None if isinstance(image, bytes) else image
                stored = image_for_storage(image, name=name, max_pixels=self.max_pixels)
        except VGError as e:
            self.errors[key] = str(e)
            return None
        except OSError as e:  # the file vanished or became unreadable since it was checked
            self.errors[key] = f"{image}: {e.strerror or e}"
            return None
        self.valid[key] = (stored.width, stored.height, stored.reencoded)
        self.recent[key] = stored
        if len(self.recent) > self.keep:
            self.recent.popitem(last=False)
        return stored


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class _Candidate:
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
    task = bar.add_task(f"reading {source.name}", total=None)
    rows = []
    for row in source.rows(args):
        rows.append(row)
        if len(rows) % 256 == 0:
            bar.update(task, completed=len(rows))
    bar.update(task, completed=len(rows), total=len(rows))
    return rows


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
    import datasets

    rows = _read_rows(source, args, bar)
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

    counts: dict[str, SplitCounts] = {}
    by_split: dict[str, list[_Candidate]] = {}
    seen: set[tuple[Any, ...]] = set()
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
        by_split[row.split].append(_Candidate(row, _image_key(row.image), expression))

    cache = _ImageCache(limit)
    total = sum(len(v) for v in by_split.values())
    task = bar.add_task("checking and writing images", total=total)
    feats = features()

    def generate(split: str) -> Iterator[dict[str, Any]]:
        c = counts[split]
        for cand in by_split[split]:
            bar.advance(task)
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
                "source": source.name,
                "width": stored.width,
                "height": stored.height,
                "objects": _objects(cand.row.objects, stored.width, stored.height),
            }

    cache_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.cache.", dir=out.parent))
    try:
        splits = {}
        for split in by_split:
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


# ---------------------------------------------------------------------------------------------
# Reporting


def summary_table(manifest: dict[str, Any]) -> Table:
    """A rich table: rows read, kept, clipped and dropped by reason, one column per split."""
    from rich.table import Table

    counts = manifest["counts"]
    splits = list(counts)
    table = Table(title=f"prepare {manifest['source']}")
    table.add_column("rows", no_wrap=True)
    for split in splits:
        table.add_column(split, justify="right", no_wrap=True)
    if len(splits) > 1:
        table.add_column("total", justify="right", no_wrap=True, style="bold")

    def add(label: str, values: list[int], style: str | None = None) -> None:
        cells = [f"{v:,}" for v in values]
        if len(splits) > 1:
            cells.append(f"{sum(values):,}")
        table.add_row(label, *cells, style=style)

    add("read", [counts[s]["read"] for s in splits])
    add("kept", [counts[s]["kept"] for s in splits], style="green")
    add("  of which clipped", [counts[s].get("clipped", 0) for s in splits])
    for reason in DROP_REASONS:
        values = [counts[s]["dropped"].get(reason, 0) for s in splits]
        add(f"dropped: {reason}", values, style="yellow" if any(values) else "dim")
    return table


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
    "summary_table",
]
