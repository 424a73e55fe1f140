"""The grid detector's validation figures (vgdistill.training.detector).

An object is "found" when the token at its centre cell says object, names the right category
and boxes it with IoU >= 0.5; category accuracy is measured at the same cells.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vgdistill.models.boxes import cxcywh_to_xyxy, paired_box_iou

if TYPE_CHECKING:
    from vgdistill.models.visual import VisualBranch


def evaluate_detector(
    visual: VisualBranch, head: torch.nn.Module, loader: Any, device: torch.device
) -> dict[str, float]:
    """found@0.5 and category accuracy at each object's centre cell, over a loader's images."""
    was = visual.training
    visual.eval()
    found = right = total = 0
    with torch.no_grad():
        for image, mask, _, cat, box, on in loader:
            image, mask = image.to(device), mask.to(device)
            tokens, _, _ = visual(image, mask)
            out = head(tokens).float().cpu()
            n_cls = out.shape[-1] - 5
            is_obj = out[..., 0][on] > 0
            label_ok = out[..., 1 : 1 + n_cls][on].argmax(-1) == cat[on]
            pred = cxcywh_to_xyxy(out[..., 1 + n_cls :][on].sigmoid())
            iou_ok = paired_box_iou(pred, cxcywh_to_xyxy(box[on])) >= 0.5
            found += int((is_obj & label_ok & iou_ok).sum())
            right += int(label_ok.sum())
            total += int(on.sum())
    visual.train(was)
    return {
        "found50": found / max(1, total),
        "category_acc": right / max(1, total),
        "objects": total,
    }
