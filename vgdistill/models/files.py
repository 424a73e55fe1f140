"""Reading weight files safely: safetensors, or torch pickles with code execution refused.

A `.pth` file is a pickle, and a pickle can run code when it is loaded. Every `.pth` here is
read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers;
the few harmless extra types that training scripts store beside the weights (argparse
arguments, numpy scalars) are allowed by name. Anything else is refused with a VGError.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from vgdistill.errors import VGError

log = logging.getLogger("vgdistill")

SAFETENSORS_SUFFIXES = (".safetensors",)
# The key, in the JSON file written beside weights, of their {file name: SHA-256}.
CHECKSUMS = "sha256"


def _allowed_globals() -> list[Any]:
    """Types besides tensors that checkpoints of TransVG/DETR carry and that run no code."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, np.dtype]
        allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    except (ImportError, AttributeError):  # pragma: no cover - numpy is a torch dependency
        pass
    return allowed


def load_torch_file(path: str | Path) -> Any:
    """Load a torch pickle (.pth/.pt/.bin) without ever executing code from it."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise VGError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise VGError(f"{path}: the file is empty (0 bytes); copy or download it again")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise VGError(
            f"{path}: refused to load: the pickle holds objects other than tensors "
            f"({_unsafe_names(path)}), which could run code; convert it to .safetensors or "
            "re-save only its state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise VGError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from None


def _unsafe_names(path: Path) -> str:
    """The globals a refused pickle names (torch's own message is long and styled)."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an unreadable archive: the names are a nicety, not the verdict
        names = []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _allowed_globals()}
    names = [n for n in names if n not in allowed]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"it needs {shown}" if names else "objects torch will not rebuild safely"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, fix: str) -> None:
    """VGError when the file's SHA-256 is not the one recorded when it was written
    (bytes changed on disk since: a damaged copy or disk); `fix` says what to do."""
    path = Path(path)
    if not path.is_file():
        raise VGError(f"{path} is missing; {fix}")
    got = sha256_file(path)
    if got != expected:
        raise VGError(
            f"{path} is damaged: its SHA-256 ({got[:12]}...) is not the one recorded when it "
            f"was saved ({expected[:12]}...); {fix}"
        )


def verify_recorded(weights: Path, record: Path, fix: str) -> None:
    """Check `weights` against the SHA-256 the JSON file `record` holds for it (VGError when
    the bytes changed); files whose record has none (written before checksums) are not checked."""
    try:
        raw = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no record (or an unreadable one): its reader reports it
        return
    sums = raw.get(CHECKSUMS) if isinstance(raw, dict) else None
    if isinstance(sums, dict) and isinstance(sums.get(weights.name), str):
        verify_sha256(weights, sums[weights.name], fix)


def load_safetensors_file(path: str | Path) -> dict[str, Any]:
    """Load a .safetensors file into CPU tensors (VGError when missing or corrupt)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VGError(f"weight file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise VGError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Any]:
    """The tensor dict inside common checkpoint wrappers ({'model': ...}, {'state_dict': ...}).

    A leading 'module.' (DistributedDataParallel) is removed from every key.
    """
    import torch

    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VGError(f"{source}: no state dict (name -> tensor) found in the file")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def load_state_file(path: str | Path) -> dict[str, Any]:
    """A state dict from a .safetensors or torch pickle file (wrappers removed)."""
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return load_safetensors_file(path)
    return unwrap_state_dict(load_torch_file(path), str(path))
