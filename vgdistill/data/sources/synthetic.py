"""The `shapes` source: a synthetic grounding benchmark generated from a seed, no files needed.

The generator itself is the package `vgdistill/data/shapes/` (`generate_rows(seed, counts,
image_size)`); this module only turns its rows into RawRows and decides the split sizes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

from vgdistill.data.sources.base import RawRow, SourceArgs
from vgdistill.errors import VGError


def shapes_counts(args: SourceArgs) -> dict[str, int]:
    """Rows per split: --split-rows, else --rows in DEFAULT_COUNTS' proportions, else those."""
    from vgdistill.data.shapes import DEFAULT_COUNTS

    if args.split_rows:
        counts = dict(args.split_rows)
    elif args.rows is not None:
        total = sum(DEFAULT_COUNTS.values())
        counts = {s: int(args.rows * n / total) for s, n in DEFAULT_COUNTS.items()}
        # Rounding leftovers go to train, so the total is exactly --rows.
        counts["train"] += args.rows - sum(counts.values())
    else:
        counts = dict(DEFAULT_COUNTS)
    if args.splits is not None:
        counts = {s: n for s, n in counts.items() if s in args.splits}
    bad = {s: n for s, n in counts.items() if n < 0}
    if bad:
        raise VGError(f"row counts must be >= 0, got {bad}")
    if sum(counts.values()) <= 0:
        raise VGError("shapes: nothing to generate; give --rows N (N > 0)")
    return counts


def _generator_files() -> list[Path]:
    """The generator package's source files, in a fixed order."""
    spec = importlib.util.find_spec("vgdistill.data.shapes")
    if spec is None or spec.origin is None:
        raise VGError("the shapes generator (vgdistill/data/shapes/) is not installed")
    return sorted(Path(spec.origin).parent.glob("*.py"))


def shapes_inputs(args: SourceArgs) -> list[Path]:
    """The generator's own files: editing any of them must invalidate a cached dataset."""
    shapes_counts(args)
    return _generator_files()


def shapes_rows(args: SourceArgs) -> Iterator[RawRow]:
    """Rows from vgdistill.data.shapes.generate_rows (imported lazily: it is only needed here)."""
    from vgdistill.data import shapes

    counts = shapes_counts(args)
    rows = shapes.generate_rows(
        seed=args.seed,
        counts=counts,
        image_size=args.image_size,
        with_objects=True,
        train_mix=args.train_mix,
    )
    for row in rows:
        yield RawRow(
            image=row["image"],
            expression=row["expression"],
            bbox_xyxy=tuple(float(v) for v in row["bbox_xyxy"]),  # type: ignore[arg-type]
            image_id=str(row["image_id"]),
            ref_id=str(row["ref_id"]),
            split=str(row["split"]),
            objects=tuple(
                (
                    f"{o['size']} {o['colour']} {o['shape']}",
                    tuple(float(v) for v in o["bbox_xyxy"]),  # type: ignore[misc]
                )
                for o in row["objects"]
            ),
        )
