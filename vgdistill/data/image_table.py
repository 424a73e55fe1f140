"""A prepared folder's image table: each distinct image stored once, rows name it by index.

Every stage that needs a row's pixels (training and eval loaders, the teacher's frames, the
detector, the visual cache, the demo) gets them here: `ImageTable.of(split)` for a split read
with `load_split` / `load_prepared`, then `load_row(row, name)`. The pixels are decoded as
stored: prepare already put each image in the frame its boxes were drawn in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill.data.manifest import IMAGES, MANIFEST
from vgdistill.errors import VGError

if TYPE_CHECKING:
    import datasets
    from PIL import Image


class ImageTable:
    """The `images` table of one prepared folder (memory-mapped; cheap to pickle)."""

    def __init__(self, folder: str | Path) -> None:
        import datasets

        self.folder = Path(folder)
        table = datasets.Dataset.load_from_disk(str(self.folder / IMAGES))
        # Bytes out; load_image decodes them (modes, limits and errors as everywhere else).
        self.ds = table.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))

    @classmethod
    def of(cls, split: datasets.Dataset) -> ImageTable:
        """The image table of a split read with load_split / load_prepared (the split's files
        lie in its prepared folder, beside the table)."""
        if "image_index" in split.column_names:
            for item in split.cache_files:
                folder = Path(item["filename"]).parent.parent
                if (folder / MANIFEST).is_file() and (folder / IMAGES).is_dir():
                    return cls(folder)
        raise VGError(
            "these rows carry no image table: read the split with load_split or load_prepared "
            "from a folder written by this version of `vgdistill prepare`"
        )

    def __len__(self) -> int:
        return len(self.ds)

    def data(self, index: int) -> bytes:
        """The encoded bytes of image `index`."""
        return self.ds[int(index)]["image"]["bytes"]

    def load(self, index: int, name: str, draft: tuple[int, int] | None = None) -> Image.Image:
        """Image `index` as RGB pixels; `draft`: a JPEG may be decoded at a reduced scale no
        smaller than this (width, height) (see images.load_image)."""
        from vgdistill.data.images import load_image

        return load_image(self.data(index), name=name, upright=False, draft=draft)

    def load_row(
        self, row: dict[str, Any], name: str, draft: tuple[int, int] | None = None
    ) -> Image.Image:
        """The image of a split row (its `image_index`), as `load`."""
        return self.load(row["image_index"], name, draft)


def file_stat(path: str) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of an image file, (None, None) when it is absent or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def changed_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The image files a prepared folder was built from (kept, and the dropped ones its
    manifest lists) whose size or mtime differ now, or that appeared or went missing."""
    import datasets

    table = datasets.Dataset.load_from_disk(str(folder / IMAGES))
    cols = table.select_columns(["file", "file_size", "file_mtime_ns"]).data
    kept = zip(*(cols.column(c).to_pylist() for c in cols.column_names), strict=True)
    dropped = manifest.get("dropped_files", [])
    return [
        file
        for file, size, mtime in [*kept, *dropped]
        if file and file_stat(file) != (size, mtime)  # images given as bytes have no file
    ]
