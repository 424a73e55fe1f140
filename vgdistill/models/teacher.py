"""The EpmVG teacher: an open_clip CLIP whose image and text embeddings are the targets.

Frozen (the paper's setting) it stays in eval mode whatever `.train()` is called with, takes
no gradient, runs under `torch.inference_mode` (in bf16 on a GPU by default), and caches the
text embedding of each distinct phrase, so a phrase seen in an earlier epoch costs nothing.
Its image input is built on the image's device from the student's image (uint8 pixels or
ImageNet-normalised floats, with the padding mask): `view` "padded" (distill.teacher_view)
resizes the whole padded square to the teacher's input size; "image" cuts the padding off and
resizes the image region as the teacher's own preprocessing does (its resize_mode: shortest
side + centre crop, squash, or longest side + centre pad). Then the teacher's own mean/std.
Where a teacher comes from (names, folders, weights) and how it is built and written:
`models.clip_source`.
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
from vgdistill.models.visual import normalize_pixels

VIEWS = ("padded", "image")


def _region_bounds(pad: Tensor) -> list[tuple[int, int, int, int]]:
    """[B,S,S] padding masks -> each image region's (top, bottom, left, right), end-exclusive."""
    rows, cols = (~pad).any(2), (~pad).any(1)  # [B,S]: which rows / columns hold the image

    def span(hit: Tensor) -> Tensor:
        at = torch.arange(hit.shape[1], device=hit.device)
        first = torch.where(hit, at, hit.shape[1]).amin(1)
        return torch.stack([first, torch.where(hit, at, -1).amax(1) + 1], 1)

    # One device -> host copy for the whole batch.
    bounds = [tuple(b) for b in torch.cat([span(rows), span(cols)], 1).tolist()]
    if any(bottom <= top for top, bottom, _, _ in bounds):
        raise ValueError("an image mask marks every pixel as padding")
    return bounds


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
        view: str = "padded",
    ) -> None:
        super().__init__()
        if view not in VIEWS:
            raise ValueError(f"teacher view {view!r} is not one of {VIEWS}")
        self.view = view
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
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.fill_color = float(pp.get("fill_color", 0))
        mean = torch.tensor(pp.get("mean", clip.visual.image_mean), dtype=torch.float32)
        std = torch.tensor(pp.get("std", clip.visual.image_std), dtype=torch.float32)
        in_mean = torch.tensor(IMAGENET_MEAN)
        in_std = torch.tensor(IMAGENET_STD)
        # ImageNet-normalised x -> teacher-normalised: (x * s_in + m_in - m_t) / s_t, one affine.
        self.register_buffer("in_scale", (in_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "in_shift", ((in_mean - mean) / std).view(1, 3, 1, 1), persistent=False
        )
        # The teacher-normalised value of open_clip's pad colour (resize_mode "longest").
        self.register_buffer(
            "fill", ((self.fill_color / 255.0 - mean) / std).view(3, 1, 1), persistent=False
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
        view: str = "padded",
    ) -> Teacher:
        """Build the teacher a resolved source names (load_weights=False: random weights)."""
        clip, tokenizer = build_clip(source, load_weights)
        return cls(
            clip, tokenizer, source.model_cfg, trainable=trainable, precision=precision, view=view
        )

    @classmethod
    def from_config(cls, distill_cfg: Any, load_weights: bool = True) -> Teacher:
        """Build the teacher named by distill.teacher (+ distill.teacher_pretrained)."""
        return cls.from_source(
            distill_source(distill_cfg),
            trainable=distill_cfg.teacher_trainable,
            precision=distill_cfg.teacher_precision,
            load_weights=load_weights,
            view=distill_cfg.teacher_view,
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

    def image_input(self, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """Student image [B,3,S,S] (uint8 pixels or ImageNet-normalised floats) and its padding
        mask [B,S,S] -> the teacher's input [B,3,s,s] in this teacher's view, on its device.

        The mask is needed for uint8 pixels (their padding must become the normalised 0 the
        float path has) and for the "image" view (it says where the image region is).
        """
        if image_mask is None and (not image.is_floating_point() or self.view == "image"):
            raise ValueError(
                "the teacher needs the image_mask with uint8 pixels or teacher_view = 'image'"
            )
        # Normalised floats in, as before uint8 images existed: that path stays bit for bit.
        # Resizing is linear, so resizing normalised values and then re-normalising to the
        # teacher's mean/std is resizing the pixels the teacher's way.
        x = normalize_pixels(image, image_mask).float()
        if self.view == "image":
            bounds = _region_bounds(image_mask.bool())
            regions = [one[:, t:b, lt:rt] for one, (t, b, lt, rt) in zip(x, bounds, strict=True)]
            return torch.stack([self._region(r) for r in regions])
        return self._resize(x, self.input_size) * self.in_scale + self.in_shift

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(
            x,
            size=size,
            mode=self.interpolation,
            align_corners=False,
            antialias=self.interpolation in ("bilinear", "bicubic"),
        )

    def _region(self, x: Tensor) -> Tensor:
        """One ImageNet-normalised image region [3,h,w] -> shaped as the teacher's own
        preprocessing would (open_clip resize_mode), teacher-normalised [3,s,s]."""
        h, w = x.shape[-2:]
        th, tw = self.input_size
        if self.resize_mode == "squash":
            size = (th, tw)
        elif self.resize_mode == "longest":
            ratio = max(h / th, w / tw)
            size = (round(h / ratio), round(w / ratio))
        elif th == tw:
            # torchvision Resize(int): the short side to the size, the long side truncated.
            short, long = min(h, w), max(h, w)
            other = int(th * long / short)
            size = (th, other) if h <= w else (other, th)
        else:
            ratio = min(h / th, w / tw)
            size = (round(h / ratio), round(w / ratio))
        x = self._resize(x[None], size)[0] * self.in_scale[0] + self.in_shift[0]
        nh, nw = x.shape[-2:]
        if nh < th or nw < tw:
            # Centre pad with the pad colour (open_clip's CenterCropOrPad), then crop below.
            out = self.fill.expand(3, max(nh, th), max(nw, tw)).clone()
            top, left = max(th - nh, 0) // 2, max(tw - nw, 0) // 2
            out[:, top : top + nh, left : left + nw] = x
            x, nh, nw = out, out.shape[1], out.shape[2]
        # torchvision's CenterCrop offsets.
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        return x[:, top : top + th, left : left + tw]

    def encode(
        self,
        image: Tensor | None,
        phrases: list[str] | None,
        *,
        image_mask: Tensor | None = None,
        want_image: bool = True,
        want_text: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(image embeddings [B,E], phrase embeddings [B,E]) in float32; None where not wanted.

        `image` and `image_mask` as `image_input` takes them.
        """
        if image_mask is not None:
            image_mask = image_mask.to(self.in_scale.device)
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
                        x = self.image_input(image.to(device), image_mask).to(dtype)
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
                x = self.image_input(image.to(device), image_mask)
                img = self.clip.encode_image(x).float()
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
