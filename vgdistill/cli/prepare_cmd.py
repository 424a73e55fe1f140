"""`vgdistill prepare`: turn the grounding data you have into one cached, checked dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import ProgressOption, console, err_console, friendly, out_option
from vgdistill.data.sources.base import SourceArgs  # no torch or datasets at import time
from vgdistill.errors import VGError

_DEFAULT = SourceArgs()


def _parse_splits(text: str | None) -> list[str] | None:
    if text is None:
        return None
    splits = [s.strip() for s in text.split(",") if s.strip()]
    if not splits:
        raise VGError("--splits needs at least one split name, e.g. --splits val,testA")
    return splits


def _parse_split_rows(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    counts = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise VGError(f"--split-rows takes split=N pairs, e.g. train=800,val=100; got {part!r}")
        try:
            counts[name.strip()] = int(value)
        except ValueError:
            raise VGError(f"--split-rows: {value!r} is not a whole number (in {part!r})") from None
    return counts


def _print_sources() -> None:
    from rich.table import Table

    from vgdistill.data.sources import SOURCES

    table = Table(title="vgdistill prepare sources", show_lines=True)
    table.add_column("source", style="bold")
    table.add_column("what it expects")
    table.add_column("example")
    for src in SOURCES.values():
        table.add_row(src.name, src.expects, src.example)
    console.print(table)


@friendly
def command(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Data source: refcoco, refcoco+, refcocog, referit, flickr30k, hf-refcoco, "
            "shapes (see --list).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        out_option(
            "Folder to write the prepared dataset to (replaced atomically; a folder that is "
            "not a prepared dataset is never replaced)."
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(
            help="Where the annotations are: the refer data root, the TransVG split "
            "folder, or a Hugging Face dump (parquet file/folder or save_to_disk "
            "folder)."
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Image folder: COCO train2014 (refcoco family; for jxu124 dumps the "
            "folder image_path is relative to), ReferItGame images, flickr30k-images."
        ),
    ] = None,
    split_by: Annotated[
        str | None,
        typer.Option(
            "--split-by",
            help="refer splitBy: refcoco unc (default) or google; "
            "refcoco+ unc; refcocog umd (default) or google.",
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="refcoco family input: auto (detect), refer "
            "(instances.json + refs(*.p)) or transvg (DATASET_SPLIT.pth files).",
        ),
    ] = _DEFAULT.format,
    splits: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated splits to keep, e.g. val,testA (default: all; "
            "TransVG's trainval = train + val is skipped unless named)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="shapes: generator seed (same seed, same bytes).")
    ] = _DEFAULT.seed,
    rows: Annotated[
        int | None,
        typer.Option(
            help="shapes: total rows, spread over the splits in the default proportions "
            "(default: train 8000, val 500, testA 500, testB 500)."
        ),
    ] = None,
    split_rows: Annotated[
        str | None,
        typer.Option(
            "--split-rows",
            help="shapes: rows per split, e.g. train=800,val=100,"
            "testA=50,testB=50 (overrides --rows).",
        ),
    ] = None,
    image_size: Annotated[
        int, typer.Option("--image-size", help="shapes: side of the generated square images.")
    ] = _DEFAULT.image_size,
    train_mix: Annotated[
        str,
        typer.Option(
            "--train-mix",
            help="shapes: the train split's phrases: natural (as val) or relational (more "
            "'nearest' phrases, fewer that the match nearest the centre answers).",
        ),
    ] = _DEFAULT.train_mix,
    exif_frame: Annotated[
        str,
        typer.Option(
            "--exif-frame",
            help="Frame to keep EXIF-rotated photos in, so boxes stay on their objects: auto "
            "(the frame whose size matches the image size the annotations give; the stored "
            "pixels, as TransVG reads them, when no size is given or both match), stored, or "
            "upright. Rows whose given size fits no allowed frame are dropped and counted.",
        ),
    ] = _DEFAULT.exif_frame,
    skip_missing: Annotated[
        bool,
        typer.Option(
            "--skip-missing",
            help="Drop rows whose image is missing or unreadable "
            "(counted in the summary) instead of stopping with an error.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if --out already holds this dataset.")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Processes that check (decode, and re-encode where needed) the images; the "
            "output is the same for any number.",
        ),
    ] = 1,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-pixels",
            help="Refuse images with more pixels than this "
            "(decompression-bomb guard; default 89,478,485 or $VGDISTILL_MAX_PIXELS).",
        ),
    ] = None,
    list_sources: Annotated[
        bool, typer.Option("--list", help="Show the sources and what each expects, then exit.")
    ] = False,
    progress: ProgressOption = True,
) -> None:
    """Prepare a grounding dataset from the files you have (or the synthetic `shapes`).

    Writes a DatasetDict with each image stored once (an images table) and one row per
    expression referring to it, plus prepare.json.

    Prints rows read, kept and dropped per split. Same inputs (and unchanged image files)
    reuse the folder; --force rebuilds.

    Examples:

      vgdistill prepare --list

      vgdistill prepare refcoco --root refer --images coco/train2014 --out data/refcoco

      vgdistill prepare refcocog --split-by umd --root refer --images coco/train2014 --out data/g

      vgdistill prepare referit --root transvg/data --images referit/images --out data/referit

      vgdistill prepare hf-refcoco --root hf/RefCOCO --out data/refcoco-hf

      vgdistill prepare shapes --rows 10000 --seed 0 --out data/shapes
    """
    if list_sources:
        _print_sources()
        return
    if source is None:
        raise VGError("name a SOURCE (see `vgdistill prepare --list`)")
    if out is None:
        raise VGError("--out DIR is required: where to write the prepared dataset")
    if rows is not None and rows <= 0:
        raise VGError(f"--rows must be > 0, got {rows}")

    from vgdistill.data.prepare import prepare
    from vgdistill.data.sources import get_source
    from vgdistill.report.tables import prepare_notes, prepare_table

    src = get_source(source)
    args = SourceArgs(
        root=root,
        images=images,
        split_by=split_by,
        format=fmt,
        splits=_parse_splits(splits),
        seed=seed,
        rows=rows,
        split_rows=_parse_split_rows(split_rows),
        image_size=image_size,
        train_mix=train_mix,
        exif_frame=exif_frame,
    )
    _warn_unused(src.options, args)
    result = prepare(
        source,
        args,
        out,
        force=force,
        skip_missing=skip_missing,
        max_pixels=max_pixels,
        workers=workers,
        console=err_console,
        progress=progress,
    )
    if result.note:
        from rich.markup import escape

        err_console.print(f"[yellow]note:[/] {escape(result.note)}", highlight=False)
    console.print(prepare_table(result.manifest))
    for line in prepare_notes(result.manifest):
        console.print(line, markup=False, highlight=False)
    if result.reused:
        console.print(
            f"[green]up to date:[/] {result.out} already holds this dataset "
            "(same source, arguments and input files); --force rebuilds it"
        )
    else:
        rate = result.rows_read / result.seconds if result.seconds > 0 else float("inf")
        console.print(
            f"[green]wrote[/] {result.rows_kept:,} rows to {result.out} in "
            f"{result.seconds:.1f}s ({rate:,.0f} rows/s read)"
        )


_OPTION_FLAGS = {
    "root": "--root",
    "images": "--images",
    "split_by": "--split-by",
    "format": "--format",
    "seed": "--seed",
    "rows": "--rows",
    "split_rows": "--split-rows",
    "image_size": "--image-size",
    "train_mix": "--train-mix",
    "exif_frame": "--exif-frame",
}


def _warn_unused(options: tuple[str, ...], args: SourceArgs) -> None:
    """Tell the user about options this source ignores (a typo'd source is a common cause)."""
    unused = [
        flag
        for name, flag in _OPTION_FLAGS.items()
        if name not in options and getattr(args, name) not in (None, getattr(_DEFAULT, name))
    ]
    if unused:
        err_console.print(f"[yellow]note:[/] this source ignores {', '.join(unused)}")
