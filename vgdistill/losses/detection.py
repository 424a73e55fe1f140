"""The grid detector's loss (vgdistill.training.detector): every visual token predicts
objectness, category and box for its grid cell.

Binary cross-entropy on objectness over all valid cells, plus cross-entropy on the category and
DETR's box terms (L1_WEIGHT * L1 + GIOU_WEIGHT * GIoU on normalised boxes) over object cells.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vgdistill.models.boxes import cxcywh_to_xyxy, paired_generalized_box_iou

L1_WEIGHT, GIOU_WEIGHT = 5.0, 2.0  # DETR's box loss weights


def detection_loss(
    out: Tensor, obj: Tensor, cat: Tensor, box: Tensor, valid: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Grid detection loss and its parts, for head outputs `out` [B,G*G,1+C+4]."""
    l_obj = F.binary_cross_entropy_with_logits(out[..., 0][valid], obj[valid])
    on = obj.bool() & valid
    n_cls = out.shape[-1] - 5
    l_cls = F.cross_entropy(out[..., 1 : 1 + n_cls][on], cat[on])
    pred = out[..., 1 + n_cls :][on].sigmoid()
    # Not losses.grounding.box_losses: its L1 sums in another order, and the detector's
    # weights must stay bit-identical.
    l1 = (pred - box[on]).abs().sum(-1).mean()
    giou = (1 - paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(box[on]))).mean()
    total = l_obj + l_cls + L1_WEIGHT * l1 + GIOU_WEIGHT * giou
    parts = {"obj": l_obj.item(), "cls": l_cls.item(), "l1": l1.item(), "giou": giou.item()}
    return total, parts


def valid_cells(mask: Tensor, grid: int) -> Tensor:
    """[B,S,S] pixel padding mask -> [B,G*G] True on cells that hold image (as DETR resizes)."""
    return ~F.interpolate(mask[None].float(), size=(grid, grid)).bool()[0].flatten(1)
