"""Devices: picking one, joining processes through Accelerate, and the CUDA speed switches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from vgdistill.errors import VGError

if TYPE_CHECKING:
    from accelerate import Accelerator


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str | None = None) -> torch.device:
    """'auto'/None -> CUDA when present else CPU; 'cpu', 'cuda', 'cuda:N' checked to exist."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise VGError(f"--device {device!r} is not one of: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise VGError(f"--device {device!r} is not one of: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VGError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VGError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return dev


def multiprocess_cpu() -> bool:
    """True under a multi-process launch on a machine without a GPU.

    Accelerate then needs `cpu=True` to join the processes over gloo; without it each process
    would silently train alone (torchrun / `accelerate launch --multi_gpu` on a CPU box).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return world > 1 and not torch.cuda.is_available() and not xpu


def make_accelerator(mixed_precision: str = "no", **kwargs: Any) -> Accelerator:
    """An Accelerator for this machine; fp16 (GPU only) falls back to fp32 on the CPU."""
    from accelerate import Accelerator

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        mixed_precision = "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=multiprocess_cpu(), **kwargs)


@contextlib.contextmanager
def gpu_bf16_autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on a GPU; nothing on the CPU, whose bf16 autocast is slow."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
