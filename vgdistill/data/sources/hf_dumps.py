"""Local Hugging Face dumps of RefCOCO: parquet files or `save_to_disk` folders.

Two column layouts are recognised from the columns themselves:
  lmms-lab/RefCOCO: question_id, image (embedded), answer (list of expressions), bbox (xywh),
                    file_name; splits val/test/testA/testB come from the file or folder names.
  jxu124/refcoco:   ref_id, image_id, split, sentences[{raw, sent, ...}], image_path, bbox (xyxy);
                    no pixels: images are read from a COCO root given with --images.
The image size the boxes were drawn on comes from `width` / `height` columns when a dump has
them, else from jxu124's raw_image_info (COCO's image entry); prepare keeps that frame.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vgdistill.data.sources.base import (
    RawRow,
    SourceArgs,
    annotated_size,
    four_floats,
    normalise_split,
    want_split,
    xywh_to_xyxy,
)
from vgdistill.errors import VGError

LMMS_COLUMNS = ("question_id", "image", "answer", "bbox", "file_name")
JXU_COLUMNS = ("ref_id", "image_id", "sentences", "bbox", "image_path")
# Hub parquet names: data/<split>-00000-of-00004.parquet (optionally -<hash>), or <split>.parquet.
_SHARD = re.compile(r"^(?P<split>\w+?)(-\d{5}-of-\d{5}.*)?$")
_BATCH = 256


def detect_layout(columns: list[str], where: str) -> str:
    """'lmms' or 'jxu124' from the column names; VGError naming what was found otherwise."""
    cols = set(columns)
    if {"answer", "bbox", "image"} <= cols:
        return "lmms"
    if {"bbox", "image_id"} <= cols and ({"sentences", "captions"} & cols):
        return "jxu124"
    raise VGError(
        f"{where}: columns {sorted(cols)} match neither lmms-lab/RefCOCO "
        f"({', '.join(LMMS_COLUMNS)}) nor jxu124/refcoco ({', '.join(JXU_COLUMNS)})"
    )


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    return sorted(root.rglob("*.parquet"))


def hf_inputs(args: SourceArgs) -> list[Path]:
    """Files that fingerprint an HF dump (and the COCO root for the jxu124 layout)."""
    root = _root(args)
    if _is_saved_dataset(root):
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        files = _parquet_files(root)
    if not files:
        raise VGError(
            f"--root {root}: no parquet files and no save_to_disk folder "
            "(dataset_dict.json or state.json) found"
        )
    if args.images is not None:
        files.append(Path(args.images).expanduser())
    return files


def _root(args: SourceArgs) -> Path:
    if args.root is None:
        raise VGError(
            "--root is required: a parquet file, a folder of them, or a save_to_disk folder"
        )
    root = Path(args.root).expanduser()
    if not root.exists():
        raise VGError(f"--root {root} does not exist")
    return root


def _split_from_name(path: Path) -> str:
    m = _SHARD.match(path.stem)
    return m.group("split") if m else path.stem


def _batches(root: Path) -> Iterator[tuple[str, str, dict[str, list[Any]]]]:
    """(container split, where, batch as column lists) from parquet files or a saved dataset."""
    if _is_saved_dataset(root):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as e:  # datasets raises several types for a damaged folder
            raise VGError(f"{root}: cannot load this save_to_disk folder ({e})") from None
        parts = (
            loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(root.name, loaded)]
        )
        for split, ds in parts:
            if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
                # Keep the encoded bytes: images are decoded once, by vgdistill's own loader.
                ds = ds.cast_column("image", datasets.Image(decode=False))
            for batch in ds.iter(batch_size=_BATCH):
                yield split, f"{root}/{split}", batch
        return
    import pyarrow.parquet as pq

    files = _parquet_files(root)
    if not files:
        raise VGError(f"--root {root}: no parquet files found")
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            for rb in pf.iter_batches(batch_size=_BATCH):
                yield _split_from_name(path), str(path), rb.to_pydict()
        except OSError as e:
            raise VGError(f"{path}: not a readable parquet file ({e})") from None


def _image_bytes(value: Any, where: str) -> bytes | str:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return str(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise VGError(f"{where}: row has no image bytes")


class _CocoResolver:
    """Finds a jxu124 row's image under the COCO root, trying the usual sub-layouts."""

    def __init__(self, images: Path | None) -> None:
        self.images = images
        self.cache: dict[tuple[str, str], str] = {}

    def __call__(self, image_path: str, image_id: str, info: Any) -> str:
        key = (image_path, image_id)
        if key in self.cache:
            return self.cache[key]
        if self.images is None:
            raise VGError(
                "this dump is in the jxu124/refcoco layout, which has no pixels: pass "
                "--images DIR with the COCO images (the folder image_path is relative to)"
            )
        cands = []
        if image_path:
            parts = Path(image_path).parts
            cands += [self.images.joinpath(*parts[i:]) for i in range(len(parts))]
        name = None
        if isinstance(info, str) and info:
            try:
                name = json.loads(info).get("file_name")
            except (json.JSONDecodeError, AttributeError):
                name = None
        if name:
            cands += [self.images / name, self.images / "train2014" / name]
        if image_id.isdigit():
            coco = f"COCO_train2014_{int(image_id):012d}.jpg"
            cands += [self.images / coco, self.images / "train2014" / coco]
        found = next((c for c in cands if c.is_file()), cands[0] if cands else None)
        if found is None:
            raise VGError(f"row for image {image_id} has no image_path to look up")
        self.cache[key] = str(found)
        return str(found)


def _row_size(batch: dict[str, list[Any]], i: int) -> tuple[int, int] | None:
    """The (width, height) a row gives for its image: width/height columns, else raw_image_info."""
    if "width" in batch and "height" in batch:
        return annotated_size(batch["width"][i], batch["height"][i])
    info = batch.get("raw_image_info", [None] * (i + 1))[i]
    if isinstance(info, str) and info:
        try:
            info = json.loads(info)
        except json.JSONDecodeError:
            return None
    if isinstance(info, dict):
        return annotated_size(info.get("width"), info.get("height"))
    return None


def _sentences(batch: dict[str, list[Any]], i: int) -> list[str]:
    sents = batch.get("sentences", [None] * (i + 1))[i]
    if sents:
        out = []
        for s in sents:
            if isinstance(s, dict):
                out.append(str(s.get("sent") or s.get("raw") or ""))
            else:
                out.append(str(s))
        return out
    return [str(c) for c in (batch.get("captions", [None] * (i + 1))[i] or [])]


def hf_rows(args: SourceArgs) -> Iterator[RawRow]:
    """One RawRow per expression of every row of the dump."""
    root = _root(args)
    images = Path(args.images).expanduser() if args.images is not None else None
    resolve = _CocoResolver(images)
    layout = None
    for container_split, where, batch in _batches(root):
        this = detect_layout(list(batch), where)
        if layout is None:
            layout = this
        elif this != layout:
            raise VGError(f"{where}: mixes the {layout} and {this} layouts in one --root")
        n = len(next(iter(batch.values()))) if batch else 0
        for i in range(n):
            what = f"{where} row {i}"
            if layout == "lmms":
                split = normalise_split(container_split, where)
                if not want_split(split, args):
                    continue
                image = _image_bytes(batch["image"][i], what)
                box = xywh_to_xyxy(batch["bbox"][i], what)
                file_name = str(batch.get("file_name", [""] * n)[i] or "")
                ref_id = str(batch.get("question_id", [""] * n)[i] or f"{split}-{i}")
                image_id = Path(file_name).stem if file_name else ref_id
                exprs = batch["answer"][i] or []
                if isinstance(exprs, str):
                    exprs = [exprs]
            else:
                raw_split = batch.get("split", [None] * n)[i] or container_split
                split = normalise_split(raw_split, where)
                if not want_split(split, args):
                    continue
                image_id = str(batch["image_id"][i])
                image = resolve(
                    str(batch.get("image_path", [""] * n)[i] or ""),
                    image_id,
                    batch.get("raw_image_info", [None] * n)[i],
                )
                box = four_floats(batch["bbox"][i], what)
                ref_id = str(batch.get("ref_id", [f"{split}-{i}"] * n)[i])
                exprs = _sentences(batch, i)
            for expr in exprs:
                yield RawRow(
                    image=image,
                    expression=str(expr),
                    bbox_xyxy=box,
                    image_id=image_id,
                    ref_id=ref_id,
                    split=split,
                    image_size=_row_size(batch, i),
                )
