"""CUDA speed switches shared by training, evaluation, prediction and the benchmark."""

from __future__ import annotations

import torch


def set_cuda_speed_flags(device: torch.device, tf32: bool = True, benchmark: bool = True) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning on a CUDA device; a no-op elsewhere.

    Both are free speed on Ampere and newer GPUs at a precision grounding does not notice
    (TF32 keeps fp32's range with a 10-bit mantissa, like the bf16 autocast already in use).
    The benchmark switches them one at a time; everything else takes the defaults.
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark
