"""Loading a checkpoint for eval and predict, with `--set` overrides of its recipe."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vgdistill.errors import VGError

# Keys the saved weights fix: changing them would rebuild a model the weights do not fit.
_FIXED_SECTIONS = ("model",)
_FIXED_KEYS = ("data.image_size", "data.max_query_len")


def override_recipe(recipe: Any, overrides: Sequence[str], source: str) -> Any:
    """`recipe` with `--set` overrides applied and validated; VGError for a key the
    checkpoint's weights fix (model.*, data.image_size, data.max_query_len)."""
    from vgdistill.recipe import apply_overrides, from_dict, parse_override

    if not overrides:
        return recipe
    for text in overrides:
        parts, _ = parse_override(text)
        key = ".".join(parts)
        if parts[0] in _FIXED_SECTIONS or key in _FIXED_KEYS:
            raise VGError(
                f"--set {text}: {key} is fixed by the checkpoint's weights; only keys that do "
                "not change the model (eval.*, data.path, data.num_workers, "
                "train.mixed_precision, ...) can be overridden here"
            )
    return from_dict(apply_overrides(recipe.to_dict(), list(overrides), source), source)


def load_for_inference(
    path: str | Path,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
) -> tuple[torch.nn.Module, Any, Path]:
    """(model in eval mode on `device`, recipe with `overrides`, checkpoint folder) from a
    checkpoint or run folder (its best/, else last/)."""
    from vgdistill.models.checkpoint import load_checkpoint, resolve_checkpoint

    folder = resolve_checkpoint(path)
    model, recipe = load_checkpoint(folder, device)
    recipe = override_recipe(recipe, overrides, f"{folder}/config.json + --set")
    return model, recipe, folder
