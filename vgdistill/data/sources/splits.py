"""TransVG / ReSC split files: `<split_root>/<ds>/<ds>_<split>.pth`, lists of tuples.

Tuple layouts (as the TransVG data loader reads them):
  refcoco family (unc, unc+, gref, gref_umd): (img_file, seg_id, bbox_xywh, phrase, attributes)
  referit:                                    (img_file, seg_file, bbox_xyxy, phrase, ...)
  flickr:                                     (img_file, bbox_xyxy, phrase)
The files are read with `torch.load(weights_only=True)`, which builds tensors and plain data
only; numpy arrays (some releases store boxes as arrays) are allowed by name, nothing else.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vgdistill.data.sources.base import (
    RawRow,
    SourceArgs,
    four_floats,
    normalise_split,
    want_split,
    xywh_to_xyxy,
)
from vgdistill.data.sources.refer import SPLIT_BY, resolve_split_by
from vgdistill.errors import VGError

# (source, splitBy) -> TransVG dataset folder name.
TRANSVG_NAMES: dict[tuple[str, str | None], str] = {
    ("refcoco", "unc"): "unc",
    ("refcoco+", "unc"): "unc+",
    ("refcocog", "umd"): "gref_umd",
    ("refcocog", "google"): "gref",
    ("referit", None): "referit",
    ("flickr30k", None): "flickr",
}
XYWH_DATASETS = {"unc", "unc+", "gref", "gref_umd"}
# trainval = train + val: preparing it by default would embed every image twice.
SKIPPED_BY_DEFAULT = {"trainval"}

# numpy globals a split file may need to rebuild arrays; each only reconstructs plain data.
_NUMPY_GLOBALS = {
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
}
_NUMPY_DTYPE = re.compile(r"^numpy\.dtypes\.\w+DType$")


def transvg_name(source: str, split_by: str | None) -> str:
    """The TransVG folder name for a source and splitBy; VGError when TransVG has none."""
    if source in SPLIT_BY:
        split_by = resolve_split_by(source, split_by)
    elif split_by is not None:
        raise VGError(f"{source} has no --split-by; drop it")
    name = TRANSVG_NAMES.get((source, split_by))
    if name is None:
        raise VGError(
            f"TransVG ships no split files for {source} --split-by {split_by}; "
            "use the refer layout (instances.json + refs(*.p)) instead"
        )
    return name


def find_split_dir(root: Path, ds: str) -> Path:
    """<root>/<ds> or <root> itself, whichever holds <ds>_*.pth files."""
    for cand in (root / ds, root):
        if cand.is_dir() and any(cand.glob(f"{glob_escape(ds)}_*.pth")):
            return cand
    raise VGError(
        f"no TransVG split files {ds}_<split>.pth under {root} or {root / ds}; "
        f"--root should be the TransVG split folder (the one holding {ds}/)"
    )


def glob_escape(text: str) -> str:
    """Escape glob metacharacters (TransVG names contain '+')."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def split_files(folder: Path, ds: str, args: SourceArgs) -> dict[str, Path]:
    """{split: file} for the requested splits (all but trainval when --splits is unset)."""
    found = {}
    for path in sorted(folder.glob(f"{glob_escape(ds)}_*.pth")):
        split = path.stem[len(ds) + 1 :]
        if split:
            found[normalise_split(split, str(path))] = path
    if args.splits is None:
        chosen = {s: p for s, p in found.items() if s not in SKIPPED_BY_DEFAULT}
    else:
        missing = [s for s in args.splits if s not in found]
        if missing:
            raise VGError(
                f"no {ds}_{missing[0]}.pth in {folder}; available splits: {', '.join(found)}"
            )
        chosen = {s: found[s] for s in args.splits}
    if not chosen:
        raise VGError(f"no split files to read in {folder}")
    return chosen


def _allowed_numpy(names: list[str]) -> list[Any] | None:
    """The numpy objects to allow when every unsafe global is a plain-array builder, else None."""
    objs = []
    for name in names:
        if name not in _NUMPY_GLOBALS and not _NUMPY_DTYPE.match(name):
            return None
        module, _, attr = name.rpartition(".")
        try:
            objs.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return None
    if objs:
        # Dtype classes are reached through numpy.dtype's reduce and are not listed by the scan.
        import numpy.dtypes

        objs += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return objs


def load_split_file(path: Path) -> list[Any]:
    """torch.load(weights_only=True), allowing numpy arrays by name; VGError otherwise."""
    import pickle

    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        objs = _allowed_numpy(names)
        if objs is None:
            raise VGError(
                f"{path}: refused to load, it needs {', '.join(names)} "
                "(a split file holds only lists of tuples)"
            ) from None
        with torch.serialization.safe_globals(objs):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise VGError(f"{path}: not a readable .pth split file ({e})") from None
    if not isinstance(data, (list, tuple)):
        raise VGError(f"{path}: expected a list of tuples, got {type(data).__name__}")
    return list(data)


def _as_box(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def transvg_inputs(source: str, args: SourceArgs) -> list[Path]:
    """Files that fingerprint a TransVG split-file input."""
    assert args.root is not None
    ds = transvg_name(source, args.split_by)
    folder = find_split_dir(args.root, ds)
    images = _images_dir(source, args)
    return [*split_files(folder, ds, args).values(), images]


_IMAGE_HINTS = {
    "referit": "the ReferItGame images folder (referit/images)",
    "flickr30k": "the Flickr30k images folder (flickr30k-images)",
}


def _images_dir(source: str, args: SourceArgs) -> Path:
    hint = _IMAGE_HINTS.get(source, "the COCO train2014 images folder")
    if args.images is None:
        raise VGError(f"pass --images DIR: {hint}")
    images = Path(args.images).expanduser()
    if not images.is_dir():
        raise VGError(f"--images {images} is not a folder; expected {hint}")
    return images


def transvg_rows(source: str, args: SourceArgs) -> Iterator[RawRow]:
    """One RawRow per tuple of each requested split file."""
    assert args.root is not None
    ds = transvg_name(source, args.split_by)
    folder = find_split_dir(args.root, ds)
    images_dir = _images_dir(source, args)
    for split, path in split_files(folder, ds, args).items():
        if not want_split(split, args):
            continue
        for i, item in enumerate(load_split_file(path)):
            what = f"{path.name} item {i}"
            if not isinstance(item, (list, tuple)) or len(item) < 3:
                raise VGError(f"{what}: expected a tuple (img_file, ..., bbox, phrase, ...)")
            if ds == "flickr" or len(item) == 3:
                img_file, box, phrase, ref = item[0], item[1], item[2], f"{split}-{i}"
            else:
                img_file, box, phrase, ref = item[0], item[2], item[3], item[1]
            box = _as_box(box)
            bbox = xywh_to_xyxy(box, what) if ds in XYWH_DATASETS else four_floats(box, what)
            img_file = str(img_file)
            yield RawRow(
                image=str(images_dir / img_file),
                expression=str(phrase),
                bbox_xyxy=bbox,
                image_id=Path(img_file).stem,
                ref_id=Path(str(ref)).stem if isinstance(ref, str) else str(ref),
                split=split,
            )
