"""Transformer building blocks shared by the DETR encoder and the fusion transformer.

The parameter layout matches `nn.MultiheadAttention` and DETR's encoder layer
(`self_attn.in_proj_weight`, `linear1`, `norm1`, ...), so DETR and TransVG checkpoints map
onto these modules by renaming prefixes only. Attention runs through
`F.scaled_dot_product_attention` (fast path) or an explicit softmax (plain path, used to test
that the fast path gives the same numbers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention with a key padding mask; queries/keys may carry a position term."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.fast = True  # SDPA kernel; False = explicit softmax(QK^T)V
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        qk_in: Tensor,
        v_in: Tensor,
        pad_mask: Tensor | None,
        first_query_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """qk_in/v_in [B,N,D]; pad_mask [B,N] True on padding. Returns (out, weights of query 0).

        The optional weights are the head-averaged attention of the first token ([REG]) over
        all keys, [B,N], computed without dropout (for visualisation).
        """
        b, n, d = qk_in.shape
        h = self.heads
        w_qk, w_v = self.in_proj_weight.split((2 * d, d))
        b_qk, b_v = self.in_proj_bias.split((2 * d, d))
        # q and k share their input (x + pos), so one matmul produces both.
        q, k = F.linear(qk_in, w_qk, b_qk).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        v = F.linear(v_in, w_v, b_v).view(b, n, h, d // h).transpose(1, 2)
        keep = None if pad_mask is None else ~pad_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        if self.fast:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            out = F.dropout(scores.softmax(-1), p, self.training) @ v
        weights = None
        if first_query_weights:
            s0 = (q[:, :, :1] @ k.transpose(-2, -1)).float() / math.sqrt(d // h)
            if keep is not None:
                s0 = s0.masked_fill(~keep, float("-inf"))
            weights = s0.softmax(-1).mean(1)[:, 0]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), weights


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer as in DETR: position added to queries and keys only."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, pos: Tensor, pad_mask: Tensor | None, first_query_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x [B,N,D], pos broadcastable to x, pad_mask [B,N]; returns (x, optional weights)."""
        attn, weights = self.self_attn(x + pos, x, pad_mask, first_query_weights)
        x = self.norm1(x + self.dropout1(attn))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x, weights


class TransformerEncoder(nn.Module):
    """A stack of post-norm encoder layers (no final norm, as DETR and TransVG)."""

    def __init__(self, layers: int, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(layers))
        # DETR/TransVG initialise every matrix of the transformer with Xavier-uniform.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, x: Tensor, pos: Tensor, pad_mask: Tensor | None, first_query_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Run all layers; optionally return the last layer's attention of token 0 ([B,N])."""
        weights = None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x, weights = layer(x, pos, pad_mask, first_query_weights and last)
        return x, weights


def sine_position_embedding(
    pad_mask: Tensor, dim: int, temperature: float = 10000.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """DETR's normalised 2-D sine embedding from a [B,h,w] padding mask -> [B,h*w,dim].

    Coordinates count valid cells only and are scaled to [0, 2*pi], so the embedding of an
    image region does not depend on how much padding surrounds it.
    """
    half = dim // 2
    valid = ~pad_mask
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    i = torch.arange(half, dtype=torch.float32, device=pad_mask.device)
    freq = temperature ** (2 * (i // 2) / half)
    px, py = x[..., None] / freq, y[..., None] / freq
    # Interleave sin (even channels) and cos (odd channels), y first then x, as DETR does.
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).flatten(1, 2).to(dtype)


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (TransVG's box head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layers with ReLU after all but the last."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
