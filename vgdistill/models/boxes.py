"""Box conversions, IoU and generalised IoU on torch tensors (any leading batch shape).

Formats: `cxcywh` (centre, width, height), `xyxy` (corners) and `xywh` (top-left, size).
The model predicts normalised cxcywh; losses and metrics work on xyxy.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Guards a 0/0 when both boxes are degenerate (zero area); far below any real area.
_EPS = 1e-12


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x0, y0, x1, y1) -> (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(x, y, w, h) with (x, y) the top-left corner -> (x0, y0, x1, y1)."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(x0, y0, x1, y1) -> (x, y, w, h) with (x, y) the top-left corner."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes (negative sizes count as zero)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(
        min=0
    )


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union of xyxy boxes that broadcast against each other."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def _giou(a: Tensor, b: Tensor) -> Tensor:
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=_EPS)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes: [N,4] x [M,4] -> [N,M]."""
    inter, union = _inter_union(boxes1[:, None, :], boxes2[None, :, :])
    return inter / union.clamp(min=_EPS)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes: [N,4] x [M,4] -> [N,M], in [-1, 1]."""
    return _giou(boxes1[:, None, :], boxes2[None, :, :])


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matching rows of xyxy boxes: [...,4] x [...,4] -> [...] (Acc@0.5 uses this)."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union.clamp(min=_EPS)


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of matching rows of xyxy boxes: [...,4] x [...,4] -> [...]."""
    return _giou(boxes1, boxes2)
