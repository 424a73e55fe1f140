"""`model.init_from`: start a new run from the weights of a vgdistill checkpoint.

Every tensor whose name and shape match is loaded; what the checkpoint lacks (typically the
distillation projections, when it was imported from TransVG or trained without a teacher)
keeps its fresh initialisation. The counts are printed so that a checkpoint that fits only in
part cannot pass unnoticed, and a checkpoint that fits not at all is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgdistill.errors import VGError

log = logging.getLogger("vgdistill")

# Student tensors a checkpoint may lack without a warning: the distillation projections
# (a TransVG import, or a run trained with distill.modality = "none", has none).
DISTILL_PREFIXES = ("distill_",)


@dataclass
class InitReport:
    """What `load_matching` did: the tensors loaded, and those it could not."""

    source: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, another shape

    def line(self) -> str:
        """One line with the counts, naming the first tensors that were not loaded."""
        parts = [
            f"{len(self.loaded)} tensors loaded",
            f"{len(self.missing)} missing{_names(self.missing)}",
            f"{len(self.unexpected)} unexpected{_names(self.unexpected)}",
        ]
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} of another shape{_names(self.mismatched)}")
        return f"init_from {self.source}: " + ", ".join(parts)

    def log(self) -> None:
        """Log the counts; warn when more than the distillation projections start untrained."""
        log.info("%s", self.line())
        odd = [k for k in self.missing if not k.startswith(DISTILL_PREFIXES)]
        if odd or self.mismatched:
            log.warning(
                "init_from: %d tensor(s) of the model start untrained%s; check that the "
                "recipe's model and data sizes match the checkpoint's",
                len(odd) + len(self.mismatched),
                _names(odd + self.mismatched),
            )


def _names(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    more = ", ..." if len(keys) > n else ""
    return f" ({', '.join(keys[:n])}{more})"


def checkpoint_arch(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint folder, its model_arch) for a checkpoint or run folder."""
    from vgdistill.models.checkpoint import read_config, resolve_checkpoint

    try:
        folder = resolve_checkpoint(path)
    except VGError as e:
        raise VGError(f"model.init_from: {e}") from None
    _, arch = read_config(folder)
    return folder, arch


def load_matching(model: nn.Module, folder: Path) -> InitReport:
    """Copy every tensor of `folder`'s weights whose name and shape match into `model`."""
    from vgdistill.models.checkpoint import WEIGHTS, verify_weights
    from vgdistill.models.files import load_safetensors_file

    state = load_safetensors_file(folder / WEIGHTS)
    own = model.state_dict()
    report = InitReport(folder)
    matching: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            matching[key] = value
    report.missing = [k for k in own if k not in state]
    report.loaded = list(matching)
    if not matching:
        raise VGError(
            f"model.init_from: no tensor of {folder} fits this model ({report.line()}); "
            "is it a checkpoint of another preset, backbone or size?"
        )
    verify_weights(folder)  # bytes damaged since the save are refused, not trained on
    model.load_state_dict(matching, strict=False)
    return report


def init_model(recipe: Any) -> tuple[nn.Module, InitReport]:
    """The student of `recipe` started from `model.init_from`, and what was loaded."""
    from vgdistill.models.factory import build_model

    folder, arch = checkpoint_arch(recipe.model.init_from)
    # Nothing pretrained is read: the checkpoint replaces it. BERT takes the checkpoint's
    # shape, so a BERT that is only named (e.g. bert-base-uncased) needs no download.
    model = build_model(recipe, load_weights=False, bert_config=arch.get("bert_config"))
    return model, load_matching(model, folder)


def build_student(recipe: Any, log_counts: bool = True) -> nn.Module:
    """The student with its starting weights: model.init_from's (counts logged when
    `log_counts`), else the recipe's own starts (backbone, DETR and BERT weights)."""
    if not recipe.model.init_from:
        from vgdistill.models.factory import build_model

        return build_model(recipe, load_weights=True)
    model, report = init_model(recipe)
    if log_counts:
        report.log()
    return model
