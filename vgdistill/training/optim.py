"""AdamW over the model's parameter groups and the learning-rate schedules of a recipe.

Schedules are expressed in optimiser steps of the run as it actually executes (per process,
after gradient accumulation), so a run on 1 or N processes follows the same curve over its
own number of steps. The schedule is a multiplier on each group's base lr, which keeps the
TransVG ratio between groups (backbone/encoder/BERT at 1e-5, the rest at 1e-4) at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from vgdistill.recipe import TrainConfig

# TransVG's poly schedule uses this power (lr_power in its reference code).
POLY_POWER = 0.9
# The step schedule multiplies the lr by this factor once, after train.lr_drop epochs.
STEP_GAMMA = 0.1


def adamw(
    param_groups: list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    device_type: str = "cpu",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the non-empty `param_groups` (in their order), with torch's fused kernel."""
    groups = [g for g in param_groups if g.get("params")]
    if not groups:
        raise ValueError("no trainable parameters: every parameter group is empty or frozen")
    # The fused implementation is one kernel per step instead of a loop over tensors: the
    # same algorithm (torch has it on CPU and CUDA; other devices keep the loop).
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused
    )


def build_optimizer(
    param_groups: list[dict[str, Any]], train_cfg: TrainConfig, device_type: str = "cpu"
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (each with its own lr) with the recipe's train.* settings."""
    return adamw(
        param_groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, device_type=device_type
    )


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_multiplier(
    train_cfg: TrainConfig, total_steps: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """The schedule as a function step -> factor applied to every group's base lr."""
    total = max(1, total_steps)
    warmup = min(train_cfg.warmup_steps, total)
    name = train_cfg.scheduler

    def warm(step: int) -> float | None:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return None

    if name == "constant":
        return lambda step: warm(step) or 1.0
    if name == "step":
        drop_at = train_cfg.lr_drop * max(1, steps_per_epoch)

        def step_schedule(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            return STEP_GAMMA if step >= drop_at else 1.0

        return step_schedule
    if name == "cosine":
        return lambda step: warmup_cosine(step, warmup, total)
    if name == "poly":

        def poly(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            progress = (step - warmup) / max(1, total - warmup)
            return max(0.0, 1.0 - min(1.0, progress)) ** POLY_POWER

        return poly
    raise ValueError(f"unknown scheduler {name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    train_cfg: TrainConfig,
    total_steps: int,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `train.scheduler`; call `.step()` once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(train_cfg, total_steps, steps_per_epoch)
    )


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with `warmup_cosine` over exactly `warmup_steps` and `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )
