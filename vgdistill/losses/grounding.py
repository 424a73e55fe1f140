"""TransVG's box loss: L1 on normalised cxcywh plus (1 - GIoU) on the same boxes as xyxy."""

from __future__ import annotations

from torch import Tensor

from vgdistill.models.boxes import cxcywh_to_xyxy, paired_generalized_box_iou


def box_losses(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(sum |pred - target| / B, mean(1 - GIoU)) for [B,4] normalised cxcywh boxes."""
    pred, target = pred.float(), target.float().to(pred.device)
    l1 = (pred - target).abs().sum() / pred.shape[0]
    giou = paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))
    return l1, (1.0 - giou).mean()
