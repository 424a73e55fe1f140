"""A prepared dataset's contract: its tables, its `prepare.json` manifest and fingerprint, loading.

A prepared folder is one `datasets` DatasetDict (`datasets.load_from_disk` opens it): a table
per split, one row per expression, and the `images` table, each distinct image stored once;
a row names its image by `image_index` (the image table's row). Everything that reads a
prepared folder goes through `read_manifest` / `load_prepared` / `load_split` (and
data/image_table.py for the pixels), so a missing, damaged, old or too-new folder gives one
clear error everywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__
from vgdistill.data.sources import Source, SourceArgs
from vgdistill.errors import VGError

if TYPE_CHECKING:
    import datasets

# 2: the `objects` column (every annotated object of the image, for `vgdistill detector`).
# 3: images kept in their annotations' frame (EXIF orientation no longer applied blindly).
# 4: each image stored once, in the `images` table; rows refer to it by `image_index`.
FORMAT_VERSION = 4
MANIFEST = "prepare.json"
# The image table's name among the DatasetDict's tables (a source split may not use it).
IMAGES = "images"
DROP_REASONS = (
    "missing image",
    "unreadable image",
    "empty phrase",
    "degenerate box",
    "box outside image",
    "image size mismatch",
    "duplicate",
)


def features() -> datasets.Features:
    """The datasets Features of a prepared split (the contract's columns)."""
    import datasets

    return datasets.Features(
        {
            "image_index": datasets.Value("int64"),  # the row of the image table
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


def image_features() -> datasets.Features:
    """The datasets Features of the image table: each distinct image once, with the size,
    the file it came from and that file's size and mtime (what reuse compares)."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),  # encoded bytes, decoding to width x height
            "image_id": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "file": datasets.Value("string"),  # "" for images a source gave as bytes
            "file_size": datasets.Value("int64"),
            "file_mtime_ns": datasets.Value("int64"),
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


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON values, paths made absolute."""
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
    """[absolute path, size, mtime] of an input (None, None when it is absent)."""
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
    if version < FORMAT_VERSION:
        # Format 2 turned EXIF-tagged images upright while their boxes stayed in the stored
        # frame (boxes may be off their objects); formats before 4 store an image per row.
        raise VGError(
            f"{folder} was prepared by an older vgdistill (format {version}, this one reads "
            f"{FORMAT_VERSION}); run the same `vgdistill prepare` command again with --force"
        )
    return manifest


def damage(folder: Path, manifest: dict[str, Any]) -> str | None:
    """What is wrong with the files of a prepared folder (the manifest lists each with its
    size), or None when every one is there with its size."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    for name, size in files.items():
        try:
            found = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found:,} bytes instead of {size:,}"
    return None


def load_prepared(path: str | Path) -> datasets.DatasetDict:
    """Open a prepared dataset's splits (memory-mapped; the image table left out: see
    data/image_table.py); VGError if missing, damaged, old or too new."""
    import datasets

    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    if not (folder / "dataset_dict.json").is_file():
        raise VGError(f"{folder} is incomplete (no dataset_dict.json); run prepare --force")
    problem = damage(folder, manifest)
    if problem is not None:
        raise VGError(f"{folder} is damaged ({problem}); run prepare --force to rebuild it")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise VGError(
            f"{folder}: cannot load the prepared dataset ({e}); run prepare --force"
        ) from None
    if not isinstance(loaded, datasets.DatasetDict) or IMAGES not in loaded:
        raise VGError(f"{folder}: no {IMAGES} table, not a prepared dataset; run prepare --force")
    return datasets.DatasetDict({name: ds for name, ds in loaded.items() if name != IMAGES})


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


__all__ = [
    "DROP_REASONS",
    "FORMAT_VERSION",
    "IMAGES",
    "MANIFEST",
    "SplitCounts",
    "damage",
    "features",
    "fingerprint",
    "image_features",
    "load_prepared",
    "load_split",
    "read_manifest",
    "source_args_dict",
]
