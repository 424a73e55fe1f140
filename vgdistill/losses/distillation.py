"""EpmVG's cross-modal distillation: the loss, and the task that wires student and teacher.

total = L1 + GIoU + alpha * L_dv + beta * L_dl, where L_dv / L_dl compare the student's
projected image / text feature (`EpmVG` computes them at `distill.position`) with the CLIP
teacher's image / phrase embedding. `DistillationTask` is the module Accelerate prepares:
one batch in, the total loss and its logged parts out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgdistill.losses.grounding import box_losses


def distill_loss(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Distance between student features and teacher embeddings, both [B,E].

    cosine: mean over the batch of 1 - cos(s, t) (the paper's loss);
    l1 / mse: mean absolute / squared difference over all elements, against the raw
    (unnormalised) CLIP embedding.
    """
    student, teacher = student.float(), teacher.float().to(student.device)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "l1":
        return F.l1_loss(student, teacher)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r}")


def distillation_losses(
    output: Any, teacher_img: Tensor | None, teacher_txt: Tensor | None, kind: str
) -> tuple[Tensor, Tensor]:
    """(L_dv, L_dl): image and text distillation losses (0 for a modality that is off)."""
    zero = output.pred_boxes.new_zeros(())
    l_img = l_txt = zero
    if output.student_img is not None:
        if teacher_img is None:
            raise ValueError("image distillation is on but no teacher image embedding given")
        l_img = distill_loss(output.student_img, teacher_img, kind)
    if output.student_txt is not None:
        if teacher_txt is None:
            raise ValueError("text distillation is on but no teacher text embedding given")
        l_txt = distill_loss(output.student_txt, teacher_txt, kind)
    return l_img, l_txt


def total_loss(
    output: Any,
    boxes: Tensor,
    teacher_img: Tensor | None,
    teacher_txt: Tensor | None,
    distill_cfg: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L1 + GIoU + alpha * L_dv + beta * L_dl, and its parts (detached) for logging."""
    l1, giou = box_losses(output.pred_boxes, boxes)
    l_img, l_txt = distillation_losses(output, teacher_img, teacher_txt, distill_cfg.loss)
    total = l1 + giou + distill_cfg.alpha * l_img + distill_cfg.beta * l_txt
    parts = {
        "loss_l1": l1.detach(),
        "loss_giou": giou.detach(),
        "loss_distill_img": l_img.detach(),
        "loss_distill_txt": l_txt.detach(),
    }
    return total, parts


def _float_output(out: Any) -> Any:
    """The model output with floating tensors in fp32 (losses are computed in full precision)."""
    changes = {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            changes[f.name] = value.float()
    return dataclasses.replace(out, **changes)


class DistillationTask(nn.Module):
    """Student forward + teacher targets + loss for one batch: the module Accelerate prepares.

    A frozen teacher (the paper) is passed to `forward`, so it is not a submodule: DDP does
    not wrap it, mixed precision does not cast it, and it is in neither the optimiser nor the
    saved state. A trainable teacher (an ablation) is given to the constructor and becomes a
    submodule, so it is trained, synchronised and saved with the run.
    """

    def __init__(
        self, student: nn.Module, distill_cfg: Any, trainable_teacher: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.student = student
        self.distill_cfg = distill_cfg
        self.teacher = trainable_teacher

    def forward(
        self, batch: dict[str, Any], teacher: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its detached parts for one batch (pixels, or cached visual tokens)."""
        cached = "visual_tokens" in batch
        out = self.student(
            batch.get("image"),
            batch.get("image_mask"),
            batch["input_ids"],
            batch["attention_mask"],
            visual=(batch["visual_tokens"], batch["visual_pad"]) if cached else None,
        )
        teacher = self.teacher if self.teacher is not None else teacher
        modality = self.distill_cfg.modality
        if out.student_img is None and modality in ("both", "image"):
            # Only cached visual tokens leave it unset (the cache holds no CNN map).
            raise ValueError(
                f"image distillation at distill.position = {self.distill_cfg.position} needs "
                "pixels, not cached visual tokens"
            )
        t_img = batch.get("teacher_image")
        t_txt = None
        if teacher is not None:
            # Only the embeddings the loss uses are computed (a cached batch brings its own).
            new_img, t_txt = teacher.encode(
                batch.get("image"),
                batch["phrases"],
                image_mask=batch.get("image_mask"),
                want_image=t_img is None and modality in ("both", "image"),
                want_text=modality in ("both", "text"),
            )
            if new_img is not None:
                t_img = new_img
        # Autocast (mixed precision) covers the network; the loss runs in fp32.
        with torch.autocast(device_type=batch["input_ids"].device.type, enabled=False):
            return total_loss(_float_output(out), batch["boxes"], t_img, t_txt, self.distill_cfg)
