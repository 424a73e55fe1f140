"""How a predicted box is scored against its ground truth: the two evaluation protocols.

`transvg` (the default) is the TransVG reference's own scoring, so Acc@0.5 is comparable with
the papers: IoU in the padded, normalised SxS frame the model sees, the prediction clamped to
that square (not to the image), and the ground truth as the reference's loader builds it:
the pixel box truncated to integers (RefCOCO-family boxes are read as x, y, w, h, so
x2 = int(x) + int(w); ReferItGame and Flickr30k boxes as x1, y1, x2, y2), scaled by the eval
resize and shifted by the centred padding.

`pixels` compares in original image pixels: the prediction mapped back with the row's pad and
scale and clamped to the image, the ground truth as prepared (float pixels). Clamping to the
image can only raise IoU, so `pixels` scores a little above `transvg`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vgdistill.models.boxes import cxcywh_to_xyxy, paired_box_iou, xyxy_to_cxcywh

PROTOCOLS = ("transvg", "pixels")
# Sources whose TransVG split files give x1, y1, x2, y2 (the others give COCO's x, y, w, h).
XYXY_SOURCES = frozenset({"referit", "flickr30k"})
# Prepared boxes are float32, so a whole-pixel width can be stored just below itself
# (x2 - x1 = 5.9999995); annotations carry at most two decimals, far above this.
_WHOLE_PIXEL_TOLERANCE = 1e-3


def to_original_xyxy(
    pred_cxcywh: torch.Tensor,
    image_size: int,
    scale: torch.Tensor,
    pad: torch.Tensor,
    orig_size: torch.Tensor,
) -> torch.Tensor:
    """Map normalised cxcywh boxes in the padded SxS frame to xyxy pixels of the original image."""
    xyxy = cxcywh_to_xyxy(pred_cxcywh.float() * image_size)
    # orig_px = (padded_px - pad) / scale, pad = (left, top)
    offset = pad.float().repeat(1, 2)
    out = (xyxy - offset) / scale.float().view(-1, 1)
    w = orig_size[:, 0].float().view(-1, 1)
    h = orig_size[:, 1].float().view(-1, 1)
    limits = torch.cat([w, h, w, h], dim=1)
    return torch.minimum(out.clamp(min=0), limits)


def xyxy_rows(sources: Sequence[Any] | None, n_rows: int) -> torch.Tensor:
    """[n_rows] bool: True where the row's source gives x1, y1, x2, y2 ground truth."""
    if sources is None:
        return torch.zeros(n_rows, dtype=torch.bool)
    return torch.tensor([s in XYXY_SOURCES for s in sources], dtype=torch.bool)


def reference_int_boxes(boxes_xyxy: torch.Tensor, xyxy: torch.Tensor) -> torch.Tensor:
    """Pixel xyxy [B,4] -> the reference loader's integer boxes (as float32 xyxy).

    `xyxy` [B] bool selects TransVG's x1, y1, x2, y2 reading (each corner truncated); the
    others are read as x, y, w, h (corner and size truncated, x2 = x + w).
    """
    b = boxes_xyxy.double()
    # Boxes are clipped to the image (>= 0), where int() truncation is floor().
    corners = torch.floor(b + _WHOLE_PIXEL_TOLERANCE)
    size = torch.floor(b[:, 2:] - b[:, :2] + _WHOLE_PIXEL_TOLERANCE)
    from_xywh = torch.cat([corners[:, :2], corners[:, :2] + size], dim=1)
    return torch.where(xyxy.view(-1, 1), corners, from_xywh).float()


def reference_targets(
    boxes_xyxy: torch.Tensor,
    xyxy: torch.Tensor,
    scale: torch.Tensor,
    pad: torch.Tensor,
    image_size: int,
) -> torch.Tensor:
    """The reference's ground truth in the padded frame, normalised xyxy [B,4]."""
    b = reference_int_boxes(boxes_xyxy, xyxy) * scale.float().view(-1, 1)
    b = b + pad.float().repeat(1, 2)
    # The reference stores its target as normalised cxcywh and converts back when scoring;
    # the same float32 round trip keeps ties at IoU 0.5 on the reference's side.
    return cxcywh_to_xyxy(xyxy_to_cxcywh(b) / image_size)


def row_ious(
    protocol: str,
    pred_cxcywh: torch.Tensor,
    batch: dict[str, Any],
    xyxy: torch.Tensor,
    image_size: int,
) -> torch.Tensor:
    """IoU [B] of each prediction with its ground truth under `protocol`; NaN where the
    prediction is not finite (so the caller can refuse it)."""
    pred = pred_cxcywh.float()
    if protocol == "transvg":
        gt = reference_targets(batch["orig_boxes"], xyxy, batch["scale"], batch["pad"], image_size)
        iou = paired_box_iou(cxcywh_to_xyxy(pred).clamp(0, 1), gt.to(pred.device))
    elif protocol == "pixels":
        mapped = to_original_xyxy(
            pred, image_size, batch["scale"], batch["pad"], batch["orig_size"]
        )
        iou = paired_box_iou(mapped, batch["orig_boxes"].float())
    else:
        raise ValueError(f"unknown eval protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    finite = torch.isfinite(pred).all(dim=-1)
    return torch.where(finite, iou, torch.full_like(iou, float("nan")))
