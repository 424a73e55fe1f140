"""The speed features bench switches: one FastPath per measured configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class FastPath:
    """Which speed features are on in one measured configuration."""

    sdpa: bool = True
    """F.scaled_dot_product_attention in the DETR encoder, the fusion transformer and BERT."""
    channels_last: bool = True
    """channels_last memory format for a CNN backbone."""
    autocast: str = "no"
    """Autocast precision: 'bf16', 'fp16' or 'no' (fp32)."""
    fused_adamw: bool = True
    """torch's fused AdamW kernel (else torch's default AdamW implementation)."""
    tf32: bool = True
    """TF32 matmuls and convolutions (CUDA only)."""
    cudnn_benchmark: bool = True
    """cuDNN autotuning of convolution kernels (CUDA only)."""
    compile: bool = False
    """torch.compile of the student (train.compile)."""
    teacher_cache: bool = True
    """Teacher text embeddings cached per distinct phrase."""
    teacher_bf16: bool = True
    """Teacher in bf16 (distill.teacher_precision)."""

    def without(self, name: str) -> FastPath:
        """This configuration with feature `name` switched off."""
        return dataclasses.replace(self, **{name: "no" if name == "autocast" else False})

    def switches(self) -> dict[str, bool]:
        """Feature name -> on/off (autocast counts as on unless 'no')."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value != "no" if f.name == "autocast" else bool(value)
        return out


PLAIN = FastPath(
    sdpa=False,
    channels_last=False,
    autocast="no",
    fused_adamw=False,
    tf32=False,
    cudnn_benchmark=False,
    compile=False,
    teacher_cache=False,
    teacher_bf16=False,
)
"""Every speed feature off: the reference the fast path is compared against."""

FEATURE_LABELS = {
    "sdpa": "SDPA attention (encoder, fusion, BERT)",
    "channels_last": "channels_last CNN backbone",
    "autocast": "autocast (mixed precision)",
    "fused_adamw": "fused AdamW",
    "tf32": "TF32 matmuls/convolutions",
    "cudnn_benchmark": "cuDNN benchmark",
    "compile": "torch.compile (train.compile)",
    "teacher_cache": "teacher phrase cache",
    "teacher_bf16": "teacher in bf16",
}
