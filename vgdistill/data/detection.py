"""The detector stage's data: a prepared split's distinct images with their object boxes as
grid targets (see vgdistill.training.detector for the detector they train)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vgdistill.errors import VGError

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch


class DetectionImages:
    """The distinct images of a prepared split with their objects, as detector targets.

    Item k: (image [3,S,S], padding mask [S,S], objectness [G*G], category id [G*G] (-100 off
    objects), box [G*G,4] normalised cxcywh in the padded frame, centre [G*G] True on the cell
    that holds an object's box centre). A token "lies on" an object when the centre of its
    grid cell is inside the box, or it is the cell holding the box centre (so small objects get
    one); where boxes overlap, the smaller object owns the cell.
    """

    def __init__(
        self, split: Any, categories: list[str], image_size: int, grid: int, stride: int
    ) -> None:
        from vgdistill.data.image_table import ImageTable
        from vgdistill.data.images import ImageIndex
        from vgdistill.data.transforms import GroundingTransform

        self.images = ImageTable.of(split)
        self.rows = ImageIndex.from_ids(split["image_id"]).first_row
        self.split = split
        self.index = {c: i for i, c in enumerate(categories)}
        self.grid, self.stride, self.size = grid, stride, image_size
        self.transform = GroundingTransform(image_size, augment=False)

        self.cache: list[torch.Tensor] | None = None  # every item's tensors, image as uint8

    def __len__(self) -> int:
        return len(self.rows)

    def load_cache(self, num_workers: int) -> None:
        """Decode every image once and keep its targets in memory when they fit (see
        data.decoded): the fit revisits each image."""
        from vgdistill.data.decoded import decode_once

        shape = (3, self.size, self.size)
        self.cache = decode_once(self, shape, num_workers, batch_size=256)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        import torch

        if self.cache is not None:
            return tuple(t[k] for t in self.cache)

        row = self.split[self.rows[k]]
        out = self.transform(self.images.load_row(row, f"image {row['image_id']}"), None, "")
        g = self.grid
        obj = torch.zeros(g * g)
        cat = torch.full((g * g,), -100, dtype=torch.int64)
        box = torch.zeros(g * g, 4)
        centre = torch.zeros(g * g, dtype=torch.bool)
        objects = row["objects"]
        # Larger boxes first, so a smaller object overlapping them claims the shared cells.
        order = sorted(
            zip(objects["category"], objects["bbox"], strict=True),
            key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1]),
        )
        centres = (torch.arange(g, dtype=torch.float32) + 0.5) * self.stride
        for category, (x1, y1, x2, y2) in order:
            # Original pixels -> padded frame (the eval transform: one scale, then a shift).
            x1, x2 = (out.scale * v + out.pad[0] for v in (x1, x2))
            y1, y2 = (out.scale * v + out.pad[1] for v in (y1, y2))
            inside_x = (centres >= x1) & (centres <= x2)
            inside_y = (centres >= y1) & (centres <= y2)
            cells = (inside_y[:, None] & inside_x[None, :]).flatten()
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            own = _cell(cy, self.stride, g) * g + _cell(cx, self.stride, g)
            cells[own] = centre[own] = True
            obj[cells] = 1.0
            cat[cells] = self.index[category]
            box[cells] = torch.tensor([cx, cy, x2 - x1, y2 - y1]) / self.size
        return out.image, out.mask, obj, cat, box, centre


def _cell(v: float, stride: int, grid: int) -> int:
    """The grid index of pixel coordinate `v`, clamped to the grid."""
    return min(grid - 1, max(0, int(v // stride)))


def objects_split(path: str, split: str) -> Any:
    """One split of a prepared dataset that carries object boxes (clear errors otherwise)."""
    from vgdistill.data.prepare import load_split

    ds = load_split(path, split)
    if "objects" not in ds.column_names or not any(
        len(o["category"]) for o in ds.select(range(min(len(ds), 100)))["objects"]
    ):
        raise VGError(
            f"{path} has no object boxes to train a detector on (source {ds[0]['source']}); "
            "`vgdistill prepare shapes` writes them"
        )
    return ds
