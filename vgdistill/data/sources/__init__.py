"""The registry of data sources `vgdistill prepare` can read.

Each Source says what it expects (shown by `prepare --list`), which options it reads, which
files fingerprint its input, and yields RawRows. Importing this module is cheap: torch,
datasets and pyarrow are imported only when a source actually reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

from vgdistill.data.sources.base import RawRow, Source, SourceArgs
from vgdistill.data.sources.hf_dumps import hf_inputs, hf_rows
from vgdistill.data.sources.refer import refer_inputs, refer_rows
from vgdistill.data.sources.splits import transvg_inputs, transvg_rows
from vgdistill.data.sources.synthetic import shapes_inputs, shapes_rows
from vgdistill.errors import VGError

__all__ = ["SOURCES", "RawRow", "Source", "SourceArgs", "get_source", "detect_format"]

FORMATS = ("auto", "refer", "transvg")


def detect_format(args: SourceArgs) -> str:
    """'refer' or 'transvg' for a refcoco-family --root (honouring --format)."""
    if args.format not in FORMATS:
        raise VGError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.format != "auto":
        return args.format
    root = _need_root(args)
    if any(root.glob("*.p")) or any(root.glob("*/refs(*).p")):
        return "refer"
    if any(root.glob("*.pth")) or any(root.glob("*/*.pth")):
        return "transvg"
    raise VGError(
        f"--root {root} holds neither the refer layout (<dataset>/refs(*).p + instances.json) "
        "nor TransVG split files (<ds>/<ds>_<split>.pth)"
    )


def _need_root(args: SourceArgs) -> Path:
    if args.root is None:
        raise VGError("--root is required for this source")
    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise VGError(f"--root {root} is not a folder")
    args.root = root
    return root


def _coco_inputs(dataset: str, args: SourceArgs) -> list[Path]:
    _need_root(args)
    if detect_format(args) == "refer":
        return refer_inputs(dataset, args)
    return transvg_inputs(dataset, args)


def _coco_rows(dataset: str, args: SourceArgs) -> Iterator[RawRow]:
    _need_root(args)
    if detect_format(args) == "refer":
        return refer_rows(dataset, args)
    return transvg_rows(dataset, args)


def _transvg_only_inputs(dataset: str, args: SourceArgs) -> list[Path]:
    _need_root(args)
    return transvg_inputs(dataset, args)


def _transvg_only_rows(dataset: str, args: SourceArgs) -> Iterator[RawRow]:
    _need_root(args)
    return transvg_rows(dataset, args)


_COCO_OPTIONS = ("root", "images", "split_by", "format", "splits", "exif_frame")


def _coco_source(name: str, split_by: str) -> Source:
    return Source(
        name=name,
        expects=(
            f"refer layout (--root with {name}/instances.json + {name}/refs(<splitBy>).p; "
            f"--split-by {split_by}) or TransVG .pth split files; --images = COCO train2014"
        ),
        options=_COCO_OPTIONS,
        inputs=partial(_coco_inputs, name),
        rows=partial(_coco_rows, name),
        example=f"vgdistill prepare {name} --root data/refer --images data/coco/train2014 "
        f"--out data/{name}",
    )


def _transvg_source(name: str, folder: str, images: str, images_example: str) -> Source:
    """A source read only from TransVG split files (<folder>/<folder>_<split>.pth)."""
    return Source(
        name=name,
        expects=f"TransVG split files (--root with {folder}/{folder}_<split>.pth); "
        f"--images = {images}",
        options=("root", "images", "splits", "exif_frame"),
        inputs=partial(_transvg_only_inputs, name),
        rows=partial(_transvg_only_rows, name),
        example=f"vgdistill prepare {name} --root data/splits --images {images_example} "
        f"--out data/{name}",
    )


SOURCES: dict[str, Source] = {
    "refcoco": _coco_source("refcoco", "unc|google"),
    "refcoco+": _coco_source("refcoco+", "unc"),
    "refcocog": _coco_source("refcocog", "umd|google"),
    "referit": _transvg_source("referit", "referit", "ReferItGame images", "data/referit/images"),
    "flickr30k": _transvg_source(
        "flickr30k", "flickr", "flickr30k-images", "data/flickr30k-images"
    ),
    "hf-refcoco": Source(
        name="hf-refcoco",
        expects="a local Hugging Face dump (--root = parquet file/folder or save_to_disk folder) "
        "in the lmms-lab/RefCOCO or jxu124/refcoco layout; jxu124 needs --images = COCO root",
        options=("root", "images", "splits", "exif_frame"),
        inputs=hf_inputs,
        rows=hf_rows,
        example="vgdistill prepare hf-refcoco --root hf/lmms-lab-RefCOCO --out data/refcoco-hf",
    ),
    "shapes": Source(
        name="shapes",
        expects="nothing: a synthetic benchmark generated from --seed (--rows, --split-rows, "
        "--image-size, --train-mix); splits train/val/testA/testB",
        options=("seed", "rows", "split_rows", "image_size", "train_mix", "splits"),
        inputs=shapes_inputs,
        rows=shapes_rows,
        example="vgdistill prepare shapes --out data/shapes --rows 10000 --seed 0",
    ),
}


def get_source(name: str) -> Source:
    """The registered source called `name`; VGError listing the valid names otherwise."""
    if name not in SOURCES:
        import difflib

        close = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise VGError(f"unknown source {name!r}{hint}; valid sources: {', '.join(SOURCES)}")
    return SOURCES[name]
