"""EpmVG: the TransVG grounding model plus the projections of its CLIP distillation.

Forward: visual tokens (backbone + DETR encoder) and BERT text tokens are projected to the
fusion width, concatenated after a learned [REG] token as `[REG], text, visual`, and run
through the fusion transformer with a learned position embedding and both padding masks.
The [REG] output goes through a 3-layer MLP and a sigmoid: a normalised (cx, cy, w, h) box.

Distillation: one student feature per modality is taken at `distill.position` -- `fusion`
(fusion output at the first text / first visual token), `linear` (outputs of text_proj /
visu_proj), `backbone` (branch outputs before those projections: DETR encoder, BERT's last kept
layer) or `cnn` (closest to the input: the CNN feature map before the 1x1 projection, BERT's
embedding output) -- pooled (`first` token or masked `mean`), and mapped by its own Linear to
the teacher's embedding size. The teacher and the loss are not part of this module
(vgdistill.models.teacher, vgdistill.losses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vgdistill.models.backbones import Backbone
from vgdistill.models.layers import MLP, Attention, TransformerEncoder, sine_position_embedding
from vgdistill.models.text import TextBranch
from vgdistill.models.visual import VisualBranch

MODALITIES = {
    "both": (True, True),
    "image": (True, False),
    "text": (False, True),
    "none": (False, False),
}


@dataclass
class GroundingOutput:
    """What the model returns for a batch."""

    pred_boxes: Tensor
    """[B,4] normalised (cx, cy, w, h) in (0, 1), float32."""
    student_img: Tensor | None = None
    """[B,E] student image feature projected to the teacher size (None when not distilled)."""
    student_txt: Tensor | None = None
    """[B,E] student text feature projected to the teacher size (None when not distilled)."""
    attention: Tensor | None = None
    """[B,N] last fusion layer's [REG] -> visual attention (head mean), when requested."""
    feature_hw: tuple[int, int] | None = None
    """(h, w) of the visual token grid; attention.view(B, h, w) is a heat map."""


def _pool(tokens: Tensor, pad: Tensor, how: str) -> Tensor:
    """[B,N,C] -> [B,C]: the first token, or the mean over non-padding tokens."""
    if how == "first":
        return tokens[:, 0]
    keep = (~pad).to(tokens.dtype).unsqueeze(-1)
    return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class EpmVG(nn.Module):
    """TransVG student + distillation projections (see the module docstring)."""

    def __init__(
        self,
        model_cfg: Any,
        distill_cfg: Any,
        image_size: int,
        max_query_len: int,
        backbone: Backbone,
        bert: Any,
        embed_dim: int = 0,
    ) -> None:
        super().__init__()
        m = model_cfg
        dim = m.hidden_dim
        self.position, self.pool = distill_cfg.position, distill_cfg.pool
        self.max_query_len = max_query_len
        self.visual = VisualBranch(backbone, dim, m.enc_layers, m.enc_heads, m.enc_ffn, m.dropout)
        self.text = TextBranch(bert)
        self.feature_side = backbone.feature_size(image_size)
        self.num_visual = self.feature_side**2
        # Names and shapes as in TransVG (reg_token / vl_pos_embed are nn.Embedding there too).
        self.visu_proj = nn.Linear(dim, dim)
        self.text_proj = nn.Linear(self.text.num_channels, dim)
        self.reg_token = nn.Embedding(1, dim)
        self.vl_pos_embed = nn.Embedding(1 + max_query_len + self.num_visual, dim)
        if m.embed_init_std != 1.0:
            # nn.Embedding draws N(0, 1), as TransVG; a small model trained for minutes
            # reads the phrase sooner when these start small (1.0 keeps the draws unchanged).
            nn.init.normal_(self.reg_token.weight, std=m.embed_init_std)
            nn.init.normal_(self.vl_pos_embed.weight, std=m.embed_init_std)
        if m.fusion_pos_init == "sine":
            # Nearby visual tokens then start with similar positions: a relation such as
            # "the square nearest the red circle" needs attention that falls off with distance,
            # which a random table has to discover first.
            side = self.feature_side
            grid = torch.zeros(1, side, side, dtype=torch.bool)
            with torch.no_grad():
                self.vl_pos_embed.weight[-self.num_visual :] = sine_position_embedding(grid, dim)[0]
        self.fusion = TransformerEncoder(
            m.fusion_layers, dim, m.fusion_heads, m.fusion_ffn, m.dropout
        )
        self.bbox_embed = MLP(dim, dim, 4, 3)
        use_img, use_txt = MODALITIES[distill_cfg.modality]
        if (use_img or use_txt) and embed_dim <= 0:
            raise ValueError("distillation needs the teacher embedding size (embed_dim > 0)")
        self.embed_dim = embed_dim if (use_img or use_txt) else 0
        # Before the projections the features have the branches' own widths.
        img_in = backbone.num_channels if self.position == "cnn" else dim
        txt_in = self.text.num_channels if self.position in ("backbone", "cnn") else dim
        self.distill_img = nn.Linear(img_in, embed_dim) if use_img else None
        self.distill_txt = nn.Linear(txt_in, embed_dim) if use_txt else None
        self._channels_last = bool(m.channels_last)
        self.set_fast_path(True)

    # ---- speed switches -------------------------------------------------------------------
    def set_fast_path(self, fast: bool = True) -> None:
        """fast: SDPA attention everywhere (+ channels_last CNN if model.channels_last).

        fast=False is the plain path (explicit softmax attention, contiguous tensors) that
        the tests compare against; the numbers agree within float tolerance.
        """
        for module in self.modules():
            if isinstance(module, Attention):
                module.fast = fast
        self.text.set_fast(fast)
        self.visual.backbone.set_channels_last(fast and self._channels_last)

    # ---- forward --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> EpmVG:
        """Train mode, except for frozen parts (no trainable parameter), which stay in eval.

        A frozen part is a fixed function: its BatchNorm statistics must not drift and its
        dropout must not fire, so a frozen visual branch gives the same tokens in training
        as in evaluation (which is also what lets training cache them).
        """
        super().train(mode)
        if mode:
            for part in (self.visual.backbone, self.visual.encoder, self.text):
                if not any(p.requires_grad for p in part.parameters()):
                    part.eval()
        return self

    def forward(
        self,
        image: Tensor | None,
        image_mask: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        return_attention: bool = False,
        visual: tuple[Tensor, Tensor] | None = None,
    ) -> GroundingOutput:
        """Predict one box per (image, phrase) pair; see GroundingOutput.

        `image` is uint8 pixels or ImageNet-normalised floats (`normalize_pixels`). `visual`
        (tokens [B,N,D], padding mask [B,N]) replaces the visual branch's output when it was
        computed ahead (a frozen branch's cached tokens); image and mask are then unused, and
        at distill.position = cnn there is no CNN map, so `student_img` stays None.
        """
        distilling = self.distill_img is not None or self.distill_txt is not None
        cnn = distilling and self.position == "cnn"
        cnn_map = txt_embed = None
        if visual is None and cnn:
            vis, vis_pad, hw, cnn_map = self.visual.features(image, image_mask.bool())
        elif visual is None:
            vis, vis_pad, hw = self.visual(image, image_mask.bool())
        else:
            vis, vis_pad = visual
            hw = (self.feature_side, self.feature_side)
        if cnn:
            txt, txt_embed = self.text.features(input_ids, attention_mask)
        else:
            txt = self.text(input_ids, attention_mask)
        txt_pad = attention_mask == 0
        b, n_txt = input_ids.shape
        total = 1 + n_txt + vis.shape[1]
        if total != self.vl_pos_embed.num_embeddings:
            raise ValueError(
                f"got {n_txt} text + {vis.shape[1]} visual tokens, but the model was built for "
                f"{self.max_query_len} + {self.num_visual} (data.max_query_len / data.image_size)"
            )
        vis_p = self.visu_proj(vis)
        txt_p = self.text_proj(txt)
        reg = self.reg_token.weight.expand(b, 1, -1).to(vis_p.dtype)
        x = torch.cat([reg, txt_p.to(vis_p.dtype), vis_p], dim=1)
        pad = torch.cat([vis_pad.new_zeros(b, 1), txt_pad, vis_pad], dim=1)
        pos = self.vl_pos_embed.weight.unsqueeze(0).to(x.dtype)
        h, weights = self.fusion(x, pos, pad, first_query_weights=return_attention)
        boxes = self.bbox_embed(h[:, 0]).float().sigmoid()
        out = GroundingOutput(pred_boxes=boxes, feature_hw=hw)
        if return_attention and weights is not None:
            out.attention = weights[:, 1 + n_txt :]
        if distilling:
            if self.position == "fusion":
                img_tok, txt_tok = h[:, 1 + n_txt :], h[:, 1 : 1 + n_txt]
            elif self.position == "linear":
                img_tok, txt_tok = vis_p, txt_p
            elif self.position == "backbone":
                img_tok, txt_tok = vis, txt
            else:
                # The CNN map's cells in the visual tokens' order (row-major), same padding.
                img_tok = None if cnn_map is None else cnn_map.flatten(2).transpose(1, 2)
                txt_tok = txt_embed
            if self.distill_img is not None and img_tok is not None:
                out.student_img = self.distill_img(_pool(img_tok, vis_pad, self.pool)).float()
            if self.distill_txt is not None:
                out.student_txt = self.distill_txt(_pool(txt_tok, txt_pad, self.pool)).float()
        return out

    # ---- optimisation ---------------------------------------------------------------------
    def _groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "backbone": [],
            "encoder": [],
            "text": [],
            "rest": [],
        }
        for name, p in self.named_parameters():
            if name.startswith("visual.backbone."):
                groups["backbone"].append((name, p))
            elif name.startswith(("visual.input_proj.", "visual.encoder.")):
                groups["encoder"].append((name, p))
            elif name.startswith("text."):
                groups["text"].append((name, p))
            else:
                groups["rest"].append((name, p))
        return groups

    def apply_freezing(self, train_cfg: Any) -> None:
        """requires_grad_(False) on every part whose learning rate is 0."""
        lrs = {
            "backbone": train_cfg.lr_backbone,
            "encoder": train_cfg.lr_encoder,
            "text": train_cfg.lr_text,
            "rest": train_cfg.lr,
        }
        for group, params in self._groups().items():
            if lrs[group] == 0:
                for _, p in params:
                    p.requires_grad_(False)

    def param_groups(self, train_cfg: Any) -> list[dict[str, Any]]:
        """AdamW groups: backbone, encoder (input_proj + DETR encoder), text (BERT), rest.

        A part with lr 0 is frozen and left out; parameters frozen by design (ResNet stem and
        layer1, as DETR) are never in a group.
        """
        self.apply_freezing(train_cfg)
        lrs = {
            "backbone": train_cfg.lr_backbone,
            "encoder": train_cfg.lr_encoder,
            "text": train_cfg.lr_text,
            "rest": train_cfg.lr,
        }
        out = []
        for group, params in self._groups().items():
            trainable = [p for _, p in params if p.requires_grad]
            if lrs[group] > 0 and trainable:
                out.append(
                    {
                        "name": group,
                        "params": trainable,
                        "lr": lrs[group],
                        "weight_decay": train_cfg.weight_decay,
                    }
                )
        return out

    def arch(self) -> dict[str, Any]:
        """Facts beyond the recipe needed to rebuild this architecture without any file."""
        return {"embed_dim": self.embed_dim, "bert_config": self.text.bert.config.to_dict()}
