"""Build an EpmVG model from a recipe: backbone, BERT, teacher size, and initial weights."""

from __future__ import annotations

import logging
from typing import Any

from vgdistill.models.backbones import Backbone
from vgdistill.models.epmvg import MODALITIES, EpmVG
from vgdistill.models.text import build_bert, build_tokenizer
from vgdistill.models.visual import load_detr_checkpoint

__all__ = ["build_model", "build_tokenizer", "needs_teacher"]

log = logging.getLogger("vgdistill")


def needs_teacher(recipe: Any) -> bool:
    """True when the recipe distils from a teacher (distill.modality != 'none')."""
    return any(MODALITIES[recipe.distill.modality])


def build_model(
    recipe: Any,
    load_weights: bool = True,
    *,
    embed_dim: int | None = None,
    bert_config: dict | None = None,
) -> EpmVG:
    """The EpmVG student for `recipe` (model, distill, data sizes, train lrs for freezing).

    load_weights=False builds the architecture with random weights and reads no weight file
    and no network (a local BERT folder's config.json is still read for its shape).
    `embed_dim` / `bert_config` pin the teacher size and BERT shape (used when rebuilding a
    saved checkpoint, so the teacher and the BERT folder need not exist any more).
    """
    m = recipe.model
    backbone = Backbone(m.backbone)
    if load_weights and m.backbone_weights:
        backbone.load_weights(m.backbone_weights)
    bert = build_bert(m, load_weights=load_weights, config=bert_config)
    if embed_dim is None:
        if needs_teacher(recipe):
            from vgdistill.models.teacher import teacher_embed_dim

            embed_dim = teacher_embed_dim(recipe.distill)
        else:
            embed_dim = 0
    model = EpmVG(
        m,
        recipe.distill,
        image_size=recipe.data.image_size,
        max_query_len=recipe.data.max_query_len,
        backbone=backbone,
        bert=bert,
        embed_dim=embed_dim,
    )
    if load_weights and m.detr_checkpoint:
        load_detr_checkpoint(model.visual, m.detr_checkpoint)
    model.apply_freezing(recipe.train)
    return model
