"""`vgdistill predict`: ground phrases on an image (or a JSONL batch) with a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vgdistill.cli.common import RunOrCheckpoint, console, err_console, friendly, out_option
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
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the results as JSON instead of a table.")
    ] = False,
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
            "copied to the output); needs --out results.jsonl.",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto (GPU when present), cpu, cuda or cuda:N.")
    ] = "auto",
) -> None:
    """Ground each phrase on the image: pixel xyxy boxes (table or --json), a drawn PNG.

    The model is loaded once per call; --batch grounds a whole JSONL file with it.

    Example: vgdistill predict runs/tiny photo.jpg "the red circle" "the left square" --out a.png
    """
    from vgdistill.models.checkpoint import resolve_checkpoint

    if batch is not None:
        if image is not None or phrases:
            raise VGError("give either IMAGE and phrases, or --batch FILE, not both")
        if out is None:
            raise VGError("--batch needs --out results.jsonl (where the results are written)")
        if show_attention:
            raise VGError("--show-attention draws on a single image; it does not apply to --batch")
        _run_batch(run_or_ckpt, batch, out, device, json_output)
        return
    if image is None:
        raise VGError('give an IMAGE and at least one phrase, e.g. photo.jpg "the red circle"')

    from vgdistill.data.images import load_image
    from vgdistill.tools.predict import (
        Predictor,
        check_phrases,
        encode_image,
        image_format,
        render,
    )

    texts = check_phrases(phrases or [])
    if out is not None:
        image_format(out)  # a bad --out fails before any work
    resolve_checkpoint(run_or_ckpt)  # a missing model is reported before the image is decoded
    img = load_image(image)
    predictor = Predictor(run_or_ckpt, device)
    found = predictor.ground(img, texts, attention=show_attention)

    if out is not None:
        from vgdistill.atomic import write_bytes

        drawn = render(img, found, show_attention=show_attention)
        write_bytes(out, encode_image(drawn, out))
    if json_output:
        record = {
            "checkpoint": str(predictor.checkpoint),
            "image": str(image),
            "width": img.width,
            "height": img.height,
            "device": str(predictor.device),
            "predictions": [
                {"phrase": g.phrase, "box": [round(v, 2) for v in g.box]} for g in found
            ],
            "out": str(out) if out is not None else None,
        }
        typer.echo(json.dumps(record, indent=2))
        return
    from vgdistill.report.tables import groundings_table

    console.print(groundings_table(found, f"{image} ({img.width}x{img.height})"))
    if out is not None:
        console.print(f"wrote {out}", highlight=False)


def _run_batch(run_or_ckpt: Path, batch: Path, out: Path, device: str, json_output: bool) -> None:
    """Predict every line of a JSONL batch; the results file appears whole or not at all."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from vgdistill.atomic import write_text
    from vgdistill.models.checkpoint import resolve_checkpoint
    from vgdistill.tools.predict import Predictor, predict_batch, read_batch

    if out.resolve() == batch.resolve():
        raise VGError("--out must differ from --batch (it would overwrite the input)")
    items = read_batch(batch)  # every line checked before the model is loaded
    resolve_checkpoint(run_or_ckpt)
    predictor = Predictor(run_or_ckpt, device)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,  # gone when done (or on an error), leaving the one result line
    ) as progress:
        task = progress.add_task("predicting", total=len(items))
        results = predict_batch(predictor, items, lambda k: progress.advance(task, k))
    write_text(out, "".join(json.dumps(r) + "\n" for r in results))
    if json_output:
        typer.echo(json.dumps({"out": str(out), "lines": len(results)}))
    else:
        console.print(f"wrote {len(results)} results to {out}", highlight=False)
