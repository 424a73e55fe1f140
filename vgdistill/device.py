"""Devices: picking one, joining processes through Accelerate, and the CUDA speed switches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
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


# What `accelerate launch` sets for its processes (from --mixed_precision or `accelerate config`).
LAUNCH_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
PRECISIONS = ("no", "bf16", "fp16")


def accelerate_config_file() -> Path:
    """Where `accelerate config` saves its default configuration (Accelerate's own rule)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.environ.get("HF_HOME", os.path.join(cache, "huggingface"))
    return Path(home).expanduser() / "accelerate" / "default_config.yaml"


def _configured_precision() -> tuple[str, str] | None:
    """(precision, where it was set) from `accelerate launch` or `accelerate config`, if any."""
    launched = os.environ.get(LAUNCH_PRECISION_ENV, "").strip().lower()
    if launched in PRECISIONS:
        return launched, "accelerate launch"
    path = accelerate_config_file()
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # an unreadable config is Accelerate's to report; ours falls back
    value = str(config.get("mixed_precision", "")).lower() if isinstance(config, dict) else ""
    return (value, f"accelerate config {path}") if value in PRECISIONS else None


def resolve_precision(value: str, cuda: bool | None = None) -> tuple[str, str]:
    """(precision, why) for a recipe's train.mixed_precision on this machine.

    'auto' takes what `accelerate launch` (its --mixed_precision or config) or the saved
    `accelerate config` asks for; with neither, bf16 on a GPU that has it and fp32 ('no')
    elsewhere. An explicit value wins, and `why` says so when Accelerate asked for another.
    fp16 needs a GPU: elsewhere it becomes 'no'.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    configured = _configured_precision()
    if value == "auto":
        if configured is not None:
            chosen, why = configured[0], f"auto: {configured[1]}"
        elif cuda and torch.cuda.is_bf16_supported():
            chosen, why = "bf16", "auto: a GPU with bf16"
        else:
            chosen, why = "no", "auto: no bf16 GPU"
    else:
        chosen, why = value, "train.mixed_precision"
        if configured is not None and configured[0] != value:
            why += f", over {configured[0]!r} from {configured[1]}"
    if chosen == "fp16" and not cuda:
        chosen, why = "no", f"{why}; fp16 needs a GPU"
    return chosen, why


def make_accelerator(mixed_precision: str = "no", **kwargs: Any) -> Accelerator:
    """An Accelerator for this machine at `resolve_precision(mixed_precision)`."""
    from accelerate import Accelerator

    chosen, _ = resolve_precision(mixed_precision)
    return Accelerator(mixed_precision=chosen, cpu=multiprocess_cpu(), **kwargs)


@contextlib.contextmanager
def gpu_bf16_autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on a GPU; nothing on the CPU, whose bf16 autocast is slow."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
