"""What makes a student run resumable: its `RunState`, the checkpoints and resumable states it
saves, and the checks before a resume (the folder holds a run, with the same recipe).

Each state also holds the recipe it was trained with and a SHA-256 of every file, so a resume
is checked against the recipe even when recipe.toml was deleted, and a damaged state is
refused instead of resumed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vgdistill.atomic import finish_files, write_text
from vgdistill.errors import VGError, disk_full_error, is_disk_full
from vgdistill.recipe import Recipe, changed_keys, load_recipe, to_toml
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
        "train.project",
        # How long to train: a run, finished or not, may be continued or cut shorter.
        "train.epochs",
        "train.max_steps",
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


def _recorded_recipes(run: RunDir) -> list[tuple[Path, Recipe]]:
    """The recipes the run folder records: recipe.toml, its newest state's, last/'s config."""
    from vgdistill.models.checkpoint import CONFIG, read_config

    found = []
    states = run.states()
    for path in [run.recipe] + ([run.state_recipe(states[-1])] if states else []):
        if path.is_file():
            try:
                found.append((path, load_recipe(path)))
            except VGError as e:
                raise VGError(f"cannot resume: {e}") from None
    if not found and (run.last / CONFIG).is_file():
        found.append((run.last / CONFIG, read_config(run.last)[0]))
    return found


def check_folder(run: RunDir, recipe: Recipe, resume: bool) -> None:
    """Refuse to overwrite a run without --resume, or to resume it with another recipe
    (compared with every recipe the folder records, so deleting recipe.toml changes nothing)."""
    # A start that failed before training (e.g. a missing weight file) leaves only the
    # recipe behind: nothing to lose, so the same command may simply run again.
    existing = run.started()
    if existing and not resume:
        raise VGError(
            f"{run.root} already holds a run; add --resume to continue it, or choose another --out"
        )
    if not existing:
        return
    for source, old in _recorded_recipes(run):
        changed = recipe_changes(old, recipe)
        if changed:
            shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
            raise RecipeMismatch(
                f"cannot resume {run.root}: the recipe differs from its "
                f"{source.relative_to(run.root)} in {shown}; use the same recipe and --set "
                "options, or another --out",
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
        """Accelerate state into state/step-N, built under a dot-name and renamed when complete
        (with the recipe and a SHA-256 of every file); a full disk removes the partial state
        and raises DiskFullError."""
        acc, step = self.acc, self.state.step
        final, partial = self.run.state(step), self.run.partial_state(step)
        if acc.is_main_process:
            self.run.state_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(partial))
            acc.wait_for_everyone()  # every process's files are in before they are summed
            if acc.is_main_process:
                write_text(self.run.state_recipe(partial), to_toml(self.recipe))
                write_text(self.run.state_checksums(partial), json.dumps(_checksums(partial)))
                finish_files(partial)
        except Exception as e:
            full = is_disk_full(e, partial)  # before the removal frees the space again
            shutil.rmtree(partial, ignore_errors=True)
            if full and not isinstance(e, VGError):
                previous = self.run.states()
                needed = _folder_bytes(previous[-1]) if previous else None
                raise disk_full_error(self.run.state_root, needed) from e
            raise
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
        fix = "delete that folder to resume from an older state"
        _verify_state(self.run, latest, fix)
        try:
            self.acc.load_state(str(latest))
        except Exception as e:  # a torn or foreign folder: say which one and what to do
            raise VGError(
                f"cannot resume from {latest}: {type(e).__name__}: {e}; {fix}"
            ) from None
        return True


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files(folder))


def _checksums(state: Path) -> dict[str, str]:
    """{path inside the state: SHA-256} of every file Accelerate wrote into `state`."""
    from vgdistill.models.files import sha256_file

    return {p.relative_to(state).as_posix(): sha256_file(p) for p in _files(state)}


def _verify_state(run: RunDir, state: Path, fix: str) -> None:
    """VGError when a file of `state` is missing or changed since it was saved (states saved
    before checksums were recorded are not checked)."""
    from vgdistill.models.files import verify_sha256

    path = run.state_checksums(state)
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise VGError(f"cannot resume from {state}: {path.name} is unreadable; {fix}") from None
    for name, expected in sums.items():
        verify_sha256(state / name, expected, f"cannot resume from it: {fix}")
