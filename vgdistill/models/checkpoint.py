"""Checkpoint folders: model.safetensors + config.json (the resolved recipe).

config.json = recipe.to_dict() plus "vgdistill_version", "model_arch" (the teacher
embedding size and the BERT config), so a checkpoint rebuilds without the BERT folder or the
teacher it was trained with, and "sha256" ({file name: SHA-256} of the weights), checked on
every load so a damaged file is refused instead of giving NaN boxes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgdistill.errors import VGError
from vgdistill.models.files import CHECKSUMS, verify_recorded
from vgdistill.training.rundir import RunDir

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(model: nn.Module, recipe: Any, folder: str | Path) -> None:
    """Write `folder` atomically: model.safetensors + config.json."""
    from safetensors.torch import save_file

    from vgdistill import __version__
    from vgdistill.atomic import build_dir
    from vgdistill.models.files import sha256_file

    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {**recipe.to_dict(), "vgdistill_version": __version__}
    if hasattr(model, "arch"):
        config["model_arch"] = model.arch()
    needed = sum(v.numel() * v.element_size() for v in state.values())
    with build_dir(folder, needed) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config[CHECKSUMS] = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (then its best/, else last/)."""
    path = Path(path)
    if not path.exists():
        raise VGError(f"checkpoint not found: {path}")
    if (path / WEIGHTS).is_file():
        return path
    folder = RunDir(path).checkpoint()
    if folder is not None:
        return folder
    raise VGError(
        f"{path} is not a checkpoint: expected {WEIGHTS} in it, or a run folder with best/ or last/"
    )


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Raise VGError naming the first mismatched keys if `state` does not fit `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {_short(shapes, 3)}")
        raise VGError(
            f"{source} does not fit this model architecture: {'; '.join(parts)} "
            "(was it saved with another preset, backbone or size?)"
        )


def load_model_weights(
    model: nn.Module, path: str | Path, allow_missing: tuple[str, ...] = ()
) -> None:
    """Load a checkpoint's weights into an existing model (strict; VGError on mismatch).

    allow_missing: key prefixes that may be absent (e.g. ("distill_",) to start EpmVG
    training from a TransVG checkpoint without distillation projections).
    """
    from vgdistill.models.files import load_safetensors_file

    folder = resolve_checkpoint(path)
    state = load_safetensors_file(folder / WEIGHTS)
    check_state_dict(model, state, str(folder), allow_missing)
    verify_weights(folder)
    model.load_state_dict(state, strict=False)


def verify_weights(folder: Path) -> None:
    """Check the weights against the SHA-256 their config.json recorded (VGError when they
    changed); checkpoints written before checksums were recorded are not checked.

    Call it after the file loaded and fitted the model: a truncated file or another model's
    weights get those more telling errors; this catches damage nothing else sees (flipped
    bytes inside the tensor data)."""
    fix = "copy the checkpoint again, or use the run's other checkpoint (best/ or last/)"
    verify_recorded(folder / WEIGHTS, folder / CONFIG, fix)


def read_config(folder: Path) -> tuple[Any, dict[str, Any]]:
    """(Recipe, model_arch) from a checkpoint folder's config.json."""
    from vgdistill.recipe import from_dict

    path = folder / CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VGError(f"{folder}: missing {CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VGError(f"{path}: corrupt ({e})") from None
    if not isinstance(raw, dict):
        raise VGError(f"{path}: corrupt (not a JSON object)")
    raw.pop("vgdistill_version", None)
    raw.pop(CHECKSUMS, None)
    arch = raw.pop("model_arch", None) or {}
    return from_dict(raw, str(path)), arch


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model in eval mode on `device`, Recipe) from a checkpoint or run folder."""
    from vgdistill.models.factory import build_model
    from vgdistill.models.files import load_safetensors_file

    folder = resolve_checkpoint(path)
    recipe, arch = read_config(folder)
    state = load_safetensors_file(folder / WEIGHTS)
    # The distillation projections fix the teacher size; no need to find the teacher.
    embed_dim = arch.get("embed_dim")
    for key in ("distill_img.weight", "distill_txt.weight"):
        if key in state:
            embed_dim = int(state[key].shape[0])
    model = build_model(
        recipe, load_weights=False, embed_dim=embed_dim, bert_config=arch.get("bert_config")
    )
    check_state_dict(model, state, str(folder))
    verify_weights(folder)
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), recipe
