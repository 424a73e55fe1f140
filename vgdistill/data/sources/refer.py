"""RefCOCO / RefCOCO+ / RefCOCOg in the `refer` layout: instances.json + refs(<splitBy>).p.

Layout (https://github.com/lichengunc/refer): `<root>/<dataset>/instances.json` (COCO: images,
annotations with `bbox` = xywh pixels) and `<root>/<dataset>/refs(<splitBy>).p`, a Python
pickle holding a list of dicts (ref_id, ann_id, image_id, split, sentences[...]). Images are
COCO train2014 files. A pickle can run code when loaded, so it is read with an unpickler that
builds only plain containers and scalars and refuses everything else.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vgdistill.data.sources.base import (
    RawRow,
    SourceArgs,
    annotated_size,
    normalise_split,
    want_split,
    xywh_to_xyxy,
)
from vgdistill.errors import VGError

# splitBy variants each dataset was released with; the first is the usual default.
SPLIT_BY: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
}

# The only globals a refs pickle may name: builders of plain containers/scalars. Protocol 2
# pickles written by Python 3 encode `bytes` through _codecs.encode; Python 2 pickles say
# __builtin__ for builtins.
_ALLOWED_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside `_ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 pickles name the builtins module __builtin__ (mapped by super()).
        if (module.replace("__builtin__", "builtins"), name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name}")


def safe_load_pickle(path: Path) -> Any:
    """Load a pickle holding only plain data; VGError (and nothing executed) otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VGError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        # Python 2 pickles (the released refs files) store text as byte strings: decode as
        # UTF-8 and never fail on a stray byte.
        return _PlainUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
    except pickle.UnpicklingError as e:
        raise VGError(
            f"{path}: refused to load this pickle ({e}); a refs file holds only lists, dicts, "
            "strings and numbers, so this one is damaged or not a refs file (or is malicious)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise VGError(f"{path}: not a readable refs pickle ({type(e).__name__}: {e})") from None


def find_dataset_dir(root: Path, dataset: str, split_by: str) -> Path:
    """The folder holding instances.json and refs(<split_by>).p: <root>/<dataset> or <root>."""
    refs_name = f"refs({split_by}).p"
    for cand in (root / dataset, root):
        if (cand / refs_name).is_file() and (cand / "instances.json").is_file():
            return cand
    for cand in (root / dataset, root):
        if (cand / refs_name).is_file():
            raise VGError(f"{cand} has {refs_name} but no instances.json next to it")
    raise VGError(
        f"no {dataset}/{refs_name} under {root}: expected the refer layout "
        f"<root>/{dataset}/instances.json + <root>/{dataset}/{refs_name}"
    )


def resolve_split_by(dataset: str, split_by: str | None) -> str:
    """The splitBy to use (the dataset's default when unset); VGError for an unknown one."""
    allowed = SPLIT_BY[dataset]
    if split_by is None:
        return allowed[0]
    if split_by not in allowed:
        raise VGError(
            f"{dataset} has no --split-by {split_by!r}; choose one of: {', '.join(allowed)}"
        )
    return split_by


def default_coco_images(root: Path) -> Path | None:
    """The COCO train2014 folder where the refer layout puts it, if present."""
    for cand in (
        root / "images" / "mscoco" / "images" / "train2014",
        root / "images" / "train2014",
        root / "train2014",
    ):
        if cand.is_dir():
            return cand
    return None


def coco_images_dir(root: Path, images: Path | None) -> Path:
    """--images if given, else the refer layout's default; VGError when neither exists."""
    if images is not None:
        images = Path(images).expanduser()
        if not images.is_dir():
            raise VGError(f"--images {images} is not a folder (expected COCO train2014 images)")
        return images
    found = default_coco_images(root)
    if found is None:
        raise VGError(
            f"pass --images DIR with the COCO train2014 images (not found under {root}/images)"
        )
    return found


def refer_inputs(dataset: str, args: SourceArgs) -> list[Path]:
    """Files that fingerprint a refer-layout input."""
    assert args.root is not None
    split_by = resolve_split_by(dataset, args.split_by)
    folder = find_dataset_dir(args.root, dataset, split_by)
    images = coco_images_dir(args.root, args.images)
    return [folder / f"refs({split_by}).p", folder / "instances.json", images]


def _check_refs(refs: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(refs, list):
        raise VGError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    need = ("ref_id", "ann_id", "image_id", "split", "sentences")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise VGError(f"{path}: ref #{i} is a {type(ref).__name__}, expected a dict")
        missing = [k for k in need if k not in ref]
        if missing:
            raise VGError(f"{path}: ref #{i} lacks {', '.join(missing)}")
    return refs


def _sentence_text(sent: Any) -> str:
    if isinstance(sent, str):
        return sent
    if isinstance(sent, dict):
        text = sent.get("sent") or sent.get("raw") or ""
        if not text and sent.get("tokens"):
            text = " ".join(str(t) for t in sent["tokens"])
        return str(text)
    return ""


def refer_rows(dataset: str, args: SourceArgs) -> Iterator[RawRow]:
    """One RawRow per sentence of every ref; boxes come from instances.json (xywh -> xyxy)."""
    assert args.root is not None
    split_by = resolve_split_by(dataset, args.split_by)
    folder = find_dataset_dir(args.root, dataset, split_by)
    images_dir = coco_images_dir(args.root, args.images)
    refs_path = folder / f"refs({split_by}).p"
    refs = _check_refs(safe_load_pickle(refs_path), refs_path)
    inst_path = folder / "instances.json"
    try:
        instances = json.loads(inst_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VGError(f"{inst_path}: not valid JSON ({e})") from None
    if not isinstance(instances, dict) or "annotations" not in instances:
        raise VGError(f"{inst_path}: expected COCO instances with an 'annotations' list")
    anns = {a["id"]: a for a in instances["annotations"]}
    images = instances.get("images", [])
    files = {im["id"]: im.get("file_name") for im in images}
    # The size COCO gives is the frame its boxes were drawn in (prepare keeps that frame).
    sizes = {im["id"]: annotated_size(im.get("width"), im.get("height")) for im in images}
    for ref in refs:
        split = normalise_split(ref["split"], str(refs_path))
        if not want_split(split, args):
            continue
        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise VGError(
                f"{refs_path}: ref {ref['ref_id']} names ann_id {ref['ann_id']}, which "
                f"{inst_path.name} lacks: are both files from the same dataset?"
            )
        box = xywh_to_xyxy(ann["bbox"], f"{inst_path} annotation {ref['ann_id']}")
        file_name = files.get(ref["image_id"]) or f"COCO_train2014_{int(ref['image_id']):012d}.jpg"
        image = str(images_dir / file_name)
        for sent in ref["sentences"]:
            yield RawRow(
                image=image,
                expression=_sentence_text(sent),
                bbox_xyxy=box,
                image_id=str(ref["image_id"]),
                ref_id=str(ref["ref_id"]),
                split=split,
                image_size=sizes.get(ref["image_id"]),
            )
