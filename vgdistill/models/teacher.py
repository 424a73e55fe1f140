"""The EpmVG teacher: an open_clip CLIP whose image and text embeddings are the targets.

Frozen (the paper's setting) it stays in eval mode whatever `.train()` is called with, takes
no gradient, runs under `torch.inference_mode` (in bf16 on a GPU by default), and caches the
text embedding of each distinct phrase, so a phrase seen in an earlier epoch costs nothing.
Its image input is built on the image's device from the student's ImageNet-normalised image:
resize to the teacher's input size, then the teacher's own mean/std. Where a teacher comes
from (names, folders, weights) and how it is built and written: `models.clip_source`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vgdistill.models.clip_source import (
    TeacherSource,
    build_clip,
    distill_source,
    write_local_dir,
)


def teacher_model_config(distill_cfg: Any) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of distill.teacher."""
    return distill_source(distill_cfg).model_cfg


def teacher_embed_dim(distill_cfg: Any) -> int:
    """CLIP embedding size E of distill.teacher, read from its config (no weights loaded)."""
    return int(teacher_model_config(distill_cfg)["embed_dim"])


class Teacher(nn.Module):
    """A CLIP image/text encoder producing distillation targets [B,E]."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        model_cfg: dict[str, Any],
        trainable: bool = False,
        precision: str = "auto",
        cache_size: int = 200_000,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.embed_dim = int(model_cfg["embed_dim"])
        self.trainable = trainable
        self.precision = precision
        self.cache_size = cache_size
        self.cache: OrderedDict[str, Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        # False = the plain path (every phrase re-encoded each call): `vgdistill bench` and the
        # tests compare it with the cached path.
        self.use_cache = True
        pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
        size = getattr(clip.visual, "image_size", pp.get("size", 224))
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.interpolation = pp.get("interpolation", "bicubic")
        mean = torch.tensor(pp.get("mean", clip.visual.image_mean), dtype=torch.float32)
        std = torch.tensor(pp.get("std", clip.visual.image_std), dtype=torch.float32)
        in_mean = torch.tensor(IMAGENET_MEAN)
        in_std = torch.tensor(IMAGENET_STD)
        # ImageNet-normalised x -> teacher-normalised: (x * s_in + m_in - m_t) / s_t, one affine.
        self.register_buffer("in_scale", (in_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "in_shift", ((in_mean - mean) / std).view(1, 3, 1, 1), persistent=False
        )
        if not trainable:
            self.clip.requires_grad_(False)
            self.clip.eval()
        super().train(trainable)

    @classmethod
    def from_source(
        cls,
        source: TeacherSource,
        trainable: bool = False,
        precision: str = "auto",
        load_weights: bool = True,
    ) -> Teacher:
        """Build the teacher a resolved source names (load_weights=False: random weights)."""
        clip, tokenizer = build_clip(source, load_weights)
        return cls(clip, tokenizer, source.model_cfg, trainable=trainable, precision=precision)

    @classmethod
    def from_config(cls, distill_cfg: Any, load_weights: bool = True) -> Teacher:
        """Build the teacher named by distill.teacher (+ distill.teacher_pretrained)."""
        return cls.from_source(
            distill_source(distill_cfg),
            trainable=distill_cfg.teacher_trainable,
            precision=distill_cfg.teacher_precision,
            load_weights=load_weights,
        )

    @property
    def frozen(self) -> bool:
        """True unless the teacher is trained too (an ablation)."""
        return not self.trainable

    def train(self, mode: bool = True) -> Teacher:
        """A frozen teacher ignores train(): it stays in eval mode (no dropout, fixed targets)."""
        return super().train(mode and self.trainable)

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """AdamW group for a trainable teacher (empty when frozen)."""
        if self.frozen or lr == 0:
            return []
        params = [p for p in self.clip.parameters() if p.requires_grad]
        return [{"name": "teacher", "params": params, "lr": lr, "weight_decay": weight_decay}]

    def run_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the teacher runs in on `device` (distill.teacher_precision; 'auto' = bf16
        on a GPU, fp32 elsewhere; a trainable teacher always trains in fp32)."""
        if self.trainable or self.precision == "fp32":
            return torch.float32
        if self.precision == "bf16" or device.type == "cuda":
            return torch.bfloat16
        return torch.float32

    def _prepare(self, device: torch.device) -> torch.dtype:
        dtype = self.run_dtype(device)
        if next(self.clip.parameters()).dtype != dtype:
            self.clip.to(dtype)
            self.cache.clear()  # embeddings from the old precision would be mixed in
        return dtype

    def image_input(self, image: Tensor) -> Tensor:
        """ImageNet-normalised [B,3,S,S] -> the teacher's input [B,3,s,s] (on the same device)."""
        x = image.float()
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(
                x,
                size=self.input_size,
                mode=self.interpolation,
                align_corners=False,
                antialias=self.interpolation in ("bilinear", "bicubic"),
            )
        return x * self.in_scale + self.in_shift

    def encode(
        self,
        image: Tensor | None,
        phrases: list[str] | None,
        *,
        want_image: bool = True,
        want_text: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(image embeddings [B,E], phrase embeddings [B,E]) in float32; None where not wanted."""
        device = self.in_scale.device
        dtype = self._prepare(device)
        img = txt = None
        if self.frozen:
            # The frozen teacher runs in its own precision (distill.teacher_precision), never
            # under the student's autocast: its targets (and cached phrases) then do not depend
            # on where it is called from, and a CPU's bf16 autocast is slow.
            with torch.autocast(device.type, enabled=False):
                if want_image and image is not None:
                    with torch.inference_mode():
                        x = self.image_input(image.to(device)).to(dtype)
                        out = self.clip.encode_image(x)
                    # clone() outside inference mode: a normal tensor the student's loss can use.
                    img = out.float().clone()
                if want_text and phrases is not None and self.use_cache:
                    txt = self._cached_text(phrases, device)
                elif want_text and phrases is not None:
                    with torch.inference_mode():
                        out = self.clip.encode_text(self.tokenizer(list(phrases)).to(device))
                    txt = out.float().clone()
        else:
            if want_image and image is not None:
                img = self.clip.encode_image(self.image_input(image.to(device))).float()
            if want_text and phrases is not None:
                tokens = self.tokenizer(list(phrases)).to(device)
                txt = self.clip.encode_text(tokens).float()
        return img, txt

    def _cached_text(self, phrases: list[str], device: torch.device) -> Tensor:
        hits = sum(1 for p in phrases if p in self.cache)
        self.cache_hits += hits
        self.cache_misses += len(phrases) - hits
        new = list(dict.fromkeys(p for p in phrases if p not in self.cache))
        if new:
            with torch.inference_mode():
                emb = self.clip.encode_text(self.tokenizer(new).to(device))
            for phrase, row in zip(new, emb, strict=True):
                self.cache[phrase] = row.clone()
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        rows = []
        for p in phrases:
            row = self.cache.get(p)
            if row is None:  # evicted by this very batch (cache smaller than the batch)
                with torch.inference_mode():
                    row = self.clip.encode_text(self.tokenizer([p]).to(device))[0].clone()
            else:
                self.cache.move_to_end(p)
            rows.append(row.to(device))
        return torch.stack(rows).float()

    def save(self, folder: str | Path) -> None:
        """Write the teacher in open_clip's local-dir layout (config + safetensors), atomically."""
        from vgdistill.atomic import build_dir

        with build_dir(folder) as tmp:
            write_local_dir(self.clip, self.model_cfg, tmp)
