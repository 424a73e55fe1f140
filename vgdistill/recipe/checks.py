"""Checks a recipe passes before training starts: the files it starts from are there."""

from __future__ import annotations

import logging
from pathlib import Path

from vgdistill.errors import VGError
from vgdistill.recipe.schema import Recipe

log = logging.getLogger("vgdistill")

OPT_OUT = '--set model.detr_checkpoint=""'


def check_start_files(recipe: Recipe) -> None:
    """Stop (VGError, exit 2) when model.detr_checkpoint names a missing file, naming the file,
    where it is published and the --set that starts without it; warn when a recipe that names
    a published DETR start (model.detr_source) runs without one."""
    m = recipe.model
    if not m.detr_checkpoint:
        if m.detr_source:
            log.warning(
                "model.detr_checkpoint is empty: the visual branch starts from %s and a random "
                "DETR encoder, not from the DETR start this recipe's results assume",
                m.backbone_weights or "random weights",
            )
        return
    path = Path(m.detr_checkpoint)
    if path.is_file():
        return
    if m.detr_source:
        where = f"it is published by {m.detr_source}; put it there or point at it with "
        where += "--set model.detr_checkpoint=PATH"
    else:
        where = "write one with `vgdistill detector RECIPE`, or give a facebookresearch/detr "
        where += "checkpoint with --set model.detr_checkpoint=PATH"
    raise VGError(
        f"model.detr_checkpoint: {path} not found ({path.resolve()}); {where}; to train without "
        f"a DETR start on purpose: {OPT_OUT}"
    )
