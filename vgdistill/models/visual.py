"""TransVG's visual branch: backbone -> 1x1 projection -> DETR transformer encoder.

Images arrive either as uint8 pixels (0-255, padding 0) or already ImageNet-normalised
floats; `normalize_pixels` maps the first to the second on the images' device.

Also reads a facebookresearch/detr checkpoint (the initialisation TransVG uses): its
`backbone.0.body.*`, `input_proj.*` and `transformer.encoder.layers.N.*` tensors map onto
this branch; DETR's decoder and detection heads are not part of TransVG and are skipped.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vgdistill.errors import VGError
from vgdistill.models.backbones import Backbone
from vgdistill.models.layers import TransformerEncoder, sine_position_embedding

log = logging.getLogger("vgdistill")

# DETR key prefix -> this branch's key prefix.
DETR_PREFIXES = {
    "backbone.0.body.": "backbone.body.",
    "input_proj.": "input_proj.",
    "transformer.encoder.": "encoder.",
}
# Parts of a DETR checkpoint that TransVG does not use.
DETR_UNUSED = ("transformer.decoder.", "query_embed.", "class_embed.", "bbox_embed.")


@lru_cache(maxsize=8)
def _imagenet_table(device: torch.device) -> Tensor:
    """[3,256]: the ImageNet-normalised float32 value of each 8-bit level, per channel."""
    # Computed on the CPU with the very operations the float transform uses, so a table
    # lookup reproduces that path bit for bit on any device (no reciprocal-multiply drift).
    levels = torch.arange(256, dtype=torch.float32).view(1, 256)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1)
    return ((levels / 255.0 - mean) / std).to(device)


def normalize_pixels(image: Tensor, pad_mask: Tensor | None) -> Tensor:
    """uint8 [...,3,H,W] -> ImageNet-normalised float32, padding (pad_mask [...,H,W] True)
    exactly 0; a floating image is taken as already normalised and returned unchanged."""
    if image.is_floating_point():
        return image
    if image.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 pixels or normalised floats, got {image.dtype}")
    table = _imagenet_table(image.device)
    shape = (*image.shape[:-3], *image.shape[-2:])
    out = torch.stack(
        [
            table[c].index_select(0, image[..., c, :, :].int().reshape(-1)).view(shape)
            for c in range(3)
        ],
        dim=-3,
    )
    if pad_mask is not None:
        out.masked_fill_(pad_mask.bool().unsqueeze(-3), 0.0)
    return out


class VisualBranch(nn.Module):
    """Image + padding mask -> visual tokens [B,N,D] with their padding mask [B,N]."""

    def __init__(
        self, backbone: Backbone, dim: int, layers: int, heads: int, ffn: int, dropout: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.num_channels, dim, kernel_size=1)
        self.encoder = TransformerEncoder(layers, dim, heads, ffn, dropout)
        self.dim = dim

    def forward(self, image: Tensor, image_mask: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """image [B,3,S,S] (uint8 or normalised float), image_mask [B,S,S] (True on padding)
        -> (tokens [B,N,D], pad mask [B,N], (h, w))."""
        tokens, pad, hw, _ = self.features(image, image_mask)
        return tokens, pad, hw

    def features(
        self, image: Tensor, image_mask: Tensor
    ) -> tuple[Tensor, Tensor, tuple[int, int], Tensor]:
        """As forward, plus the CNN feature map [B,C,h,w] before the 1x1 projection."""
        # Padding is 0 after normalisation in every loader here and in TransVG; forcing it to
        # 0 makes the output independent of whatever values a caller leaves in the padding.
        image = normalize_pixels(image, image_mask).masked_fill(image_mask[:, None], 0.0)
        feat = self.backbone(image)
        h, w = feat.shape[-2:]
        # Nearest-neighbour resize of the pixel mask to the feature grid, as DETR does.
        mask = F.interpolate(image_mask[None].float(), size=(h, w)).bool()[0]
        src = self.input_proj(feat).flatten(2).transpose(1, 2)
        pos = sine_position_embedding(mask, self.dim, dtype=src.dtype)
        pad = mask.flatten(1)
        out, _ = self.encoder(src, pos, pad)
        return out, pad, (h, w), feat


def detr_to_visual_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename DETR keys to VisualBranch keys; returns (mapped, keys neither mapped nor skipped)."""
    mapped, unknown = {}, []
    for key, value in state.items():
        for src, dst in DETR_PREFIXES.items():
            if key.startswith(src):
                mapped[dst + key[len(src) :]] = value
                break
        else:
            if not key.startswith(DETR_UNUSED):
                unknown.append(key)
    return mapped, unknown


def load_detr_checkpoint(visual: VisualBranch, path: str | Path) -> dict[str, list[str]]:
    """Initialise backbone, input projection and encoder from a DETR checkpoint file.

    Returns {"missing": [...], "unexpected": [...]} (also logged); shape mismatches are errors.
    """
    from vgdistill.models.files import load_state_file

    if not Path(path).is_file():
        raise VGError(
            f"model.detr_checkpoint: {path} not found; write one with `vgdistill detector "
            "RECIPE` (the demo does), or give a facebookresearch/detr checkpoint"
        )
    state = load_state_file(path)
    mapped, unknown = detr_to_visual_state(state)
    if not mapped:
        raise VGError(
            f"{path}: no DETR weights found (expected keys such as backbone.0.body.conv1.weight, "
            "transformer.encoder.layers.0.*, input_proj.weight)"
        )
    mapped = {k: v for k, v in mapped.items() if not k.endswith("num_batches_tracked")}
    own = visual.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise VGError(f"{path}: DETR weights do not fit this model: {'; '.join(bad[:3])}")
    _verify_detector(Path(path))
    result = visual.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys) + unknown
    log.info(
        "DETR init from %s: %d tensors loaded, %d missing%s, %d unexpected%s",
        path,
        len(mapped) - len(result.unexpected_keys),
        len(missing),
        f" ({', '.join(missing[:5])})" if missing else "",
        len(unexpected),
        f" ({', '.join(unexpected[:5])})" if unexpected else "",
    )
    return {"missing": missing, "unexpected": unexpected}


def _verify_detector(path: Path) -> None:
    """Refuse a `vgdistill detector` file whose bytes changed since its detector.json recorded
    their SHA-256 (other DETR checkpoints have no record and are not checked)."""
    from vgdistill.models.files import verify_recorded
    from vgdistill.training.detector import REPORT_FILE

    fix = "copy the detector folder again, or fit it again with `vgdistill detector --force`"
    verify_recorded(path, path.parent / REPORT_FILE, fix)
