"""`vgdistill predict`: ground phrases on an image (or a JSONL batch) with a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import (
    RunOrCheckpoint,
    SetOption,
    check_json_out,
    console,
    err_console,
    friendly,
    out_option,
    write_json_out,
)
from vgdistill.errors import VGError


@friendly
def command(
    run_or_ckpt: RunOrCheckpoint,
    image: Annotated[
        Path | None, typer.Argument(help="Image file (any format PIL reads).", show_default=False)
    ] = None,
    phrases: Annotated[
        list[str] | None,
        typer.Argument(help="One or more phrases to ground, each in quotes.", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        out_option(
            "Single image: save the image with boxes and phrases drawn (e.g. out.png). "
            "--batch: the JSONL file of results."
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Also write the results as JSON to this file; '-' prints them to stdout "
            "instead of the table.",
        ),
    ] = None,
    show_attention: Annotated[
        bool,
        typer.Option(
            "--show-attention",
            help="Overlay where the [REG] token attends in the last fusion layer (heat map).",
        ),
    ] = False,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            help='JSONL file, one {"image": PATH, "phrase": TEXT} per line (other keys are '
            "copied to the output); needs --out results.jsonl. A line whose text is not "
            'valid Unicode gets an "error" instead of a box; the other lines go on.',
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto (GPU when present), cpu, cuda or cuda:N.")
    ] = "auto",
    overrides: SetOption = None,
) -> None:
    """Ground each phrase on the image: pixel xyxy boxes (table or --json), a drawn PNG.

    Boxes are in the upright image: a photo's EXIF orientation is applied first, as image
    viewers show it. The model is loaded once per call and the image goes through the
    visual branch once for all its phrases; --batch grounds a whole JSONL file with it.
    --set changes recipe keys that do not change the model (e.g. eval.batch_size).

    Example: vgdistill predict runs/tiny photo.jpg "the red circle" "the left square" --out a.png
    """
    from vgdistill.atomic import check_file_out

    if out is not None:
        check_file_out(out, "--out")  # an unwritable output fails before any work
    check_json_out(json_out)
    if batch is not None:
        if image is not None or phrases:
            raise VGError("give either IMAGE and phrases, or --batch FILE, not both")
        if out is None:
            raise VGError("--batch needs --out results.jsonl (where the results are written)")
        if show_attention:
            raise VGError("--show-attention draws on a single image; it does not apply to --batch")
        _run_batch(run_or_ckpt, batch, out, device, json_out, overrides or [])
        return
    if image is None:
        raise VGError('give an IMAGE and at least one phrase, e.g. photo.jpg "the red circle"')

    _run_single(run_or_ckpt, image, phrases or [], out, json_out, show_attention, device, overrides)


def _run_single(
    run_or_ckpt: Path,
    image: Path,
    phrases: list[str],
    out: Path | None,
    json_out: Path | None,
    show_attention: bool,
    device: str,
    overrides: list[str] | None,
) -> None:
    """Ground the phrases on one image: the table (or JSON), the drawn image."""
    from vgdistill.models.checkpoint import resolve_checkpoint
    from vgdistill.tools.grounder import FRAME, Grounder, as_rgb_image, check_phrases
    from vgdistill.tools.predict import encode_image, image_format, render

    texts = check_phrases(phrases)
    if out is not None:
        image_format(out)  # a bad --out fails before any work
    resolve_checkpoint(run_or_ckpt)  # a missing model is reported before the image is decoded
    img = as_rgb_image(image)
    grounder = Grounder.from_pretrained(run_or_ckpt, device, overrides or [])
    found = grounder.ground(img, texts, attention=show_attention)

    if out is not None:
        from vgdistill.atomic import write_bytes

        drawn = render(img, found, show_attention=show_attention)
        write_bytes(out, encode_image(drawn, out))
    record = {
        "checkpoint": str(grounder.checkpoint),
        "image": str(image),
        "width": img.width,
        "height": img.height,
        "frame": FRAME,
        "device": str(grounder.device),
        "predictions": [{"phrase": g.phrase, "box": [round(v, 2) for v in g.box]} for g in found],
        "out": str(out) if out is not None else None,
    }
    if write_json_out(json_out, record):
        return
    from vgdistill.report.tables import groundings_table

    title = f"{image} ({img.width}x{img.height}, {FRAME}: EXIF orientation applied)"
    console.print(groundings_table(found, title))
    for path in (out, json_out):
        if path is not None:
            console.print(f"wrote {path}", highlight=False)


def _run_batch(
    run_or_ckpt: Path,
    batch: Path,
    out: Path,
    device: str,
    json_out: Path | None,
    overrides: list[str],
) -> None:
    """Predict every line of a JSONL batch; the results file appears whole or not at all."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from vgdistill.atomic import write_text
    from vgdistill.models.checkpoint import resolve_checkpoint
    from vgdistill.tools.grounder import Grounder
    from vgdistill.tools.predict import predict_batch, read_batch

    if out.resolve() == batch.resolve():
        raise VGError("--out must differ from --batch (it would overwrite the input)")
    items = read_batch(batch)  # every line checked before the model is loaded
    resolve_checkpoint(run_or_ckpt)
    grounder = Grounder.from_pretrained(run_or_ckpt, device, overrides)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,  # gone when done (or on an error), leaving the one result line
    ) as progress:
        task = progress.add_task("predicting", total=len(items))
        results = predict_batch(grounder, items, lambda k: progress.advance(task, k))
    write_text(out, "".join(json.dumps(r) + "\n" for r in results))
    errors = [item.error for item in items if item.error is not None]
    for error in errors:
        err_console.print(f"skipped {error}", highlight=False, markup=False, soft_wrap=True)
    summary = {"out": str(out), "lines": len(results), "errors": len(errors)}
    if write_json_out(json_out, summary):
        return
    skipped = f' ({len(errors)} line(s) skipped, marked "error")' if errors else ""
    console.print(f"wrote {len(results)} results to {out}{skipped}", highlight=False)
