"""What makes a student run resumable: its `RunState`, the checkpoints and resumable states it
saves, and the checks before a resume (the folder holds a run, with the same recipe)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vgdistill.errors import VGError
from vgdistill.recipe import Recipe, changed_keys, load_recipe
from vgdistill.training.loop import Position
from vgdistill.training.rundir import RunDir, discard

# Recipe keys that may change between a run and its --resume: they do not change the
# weights the run produces (checkpoint cadence, logging, loader workers, eval batch size).
RESUMABLE_KEYS = frozenset(
    {
        "train.log_every",
        "train.save_every",
        "train.keep",
        "train.trackers",
        "data.num_workers",
        "eval.batch_size",
        "eval.splits",
    }
)


class RecipeMismatch(VGError):
    """A resume refused because the run folder was trained with another recipe."""

    def __init__(self, message: str, keys: str) -> None:
        super().__init__(message)
        self.keys = keys  # the differing recipe keys, as the message shows them


class TrainInterrupted(VGError):
    """Training stopped on request (Ctrl-C / SIGTERM) after saving a resumable state."""

    exit_code = 130


@dataclass
class RunState(Position):
    """Where a run stands; saved inside every resumable checkpoint."""

    best_acc50: float = -1.0
    best_step: int = -1
    evaluated_step: int = -1  # step of the last validation, to avoid evaluating twice
    last_step: int = -1  # step at which last/ was written
    finished: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Plain dict for Accelerate's checkpointing."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        for key, value in state.items():
            setattr(self, key, value)


def recipe_changes(old: Recipe, new: Recipe) -> list[str]:
    """Recipe keys that differ between `old` and `new` and would change the weights."""
    return [k for k in changed_keys(old, new) if k not in RESUMABLE_KEYS]


def check_folder(run: RunDir, recipe: Recipe, resume: bool) -> None:
    """Refuse to overwrite a run without --resume, or to resume it with another recipe."""
    # A start that failed before training (e.g. a missing weight file) leaves only the
    # recipe behind: nothing to lose, so the same command may simply run again.
    existing = run.started()
    if existing and not resume:
        raise VGError(
            f"{run.root} already holds a run; add --resume to continue it, or choose another --out"
        )
    if existing and run.recipe.exists():
        try:
            old = load_recipe(run.recipe)
        except VGError as e:
            raise VGError(f"cannot resume: {e}") from None
        changed = recipe_changes(old, recipe)
        if changed:
            shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
            raise RecipeMismatch(
                f"cannot resume {run.root}: the recipe differs from its {run.recipe.name} in "
                f"{shown}; use the same recipe and --set options, or another --out",
                shown,
            )


class Checkpoints:
    """Saves and loads a run's model checkpoints and resumable states (every process calls)."""

    def __init__(self, acc: Any, run: RunDir, recipe: Recipe, state: RunState) -> None:
        self.acc, self.run, self.recipe, self.state = acc, run, recipe, state

    def save_model(self, student: nn.Module, target: Path) -> Path:
        """The bare student's weights and config into `target` (main process writes)."""
        from vgdistill.models.checkpoint import save_checkpoint

        if self.acc.is_main_process:
            save_checkpoint(student, self.recipe, target)
        self.acc.wait_for_everyone()
        return target

    def save_last(self, student: nn.Module) -> None:
        """The checkpoint of the current step into last/."""
        self.state.last_step = self.state.step
        self.save_model(student, self.run.last)

    def save_state(self) -> Path:
        """Accelerate state into state/step-N, built under a dot-name and renamed when complete."""
        acc, step = self.acc, self.state.step
        final, partial = self.run.state(step), self.run.partial_state(step)
        if acc.is_main_process:
            self.run.state_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                discard(final)
            os.replace(partial, final)
            for old in self.run.states()[: -self.recipe.train.keep]:
                discard(old)
        acc.wait_for_everyone()
        return final

    def load_latest(self) -> bool:
        """Load the newest resumable state, if any; True when one was loaded."""
        found = self.run.states()
        if not found:
            return False
        latest = found[-1]
        try:
            self.acc.load_state(str(latest))
        except Exception as e:  # a torn or foreign folder: say which one and what to do
            raise VGError(
                f"cannot resume from {latest}: {type(e).__name__}: {e}; delete that folder to "
                "resume from an older state"
            ) from None
        return True
