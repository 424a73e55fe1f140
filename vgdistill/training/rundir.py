"""The run folder: the one place that knows the name of every file a training run writes.

    runs/NAME/
      recipe.toml          the resolved recipe the run was started with
      metrics.jsonl        one JSON record per logging window and per validation
      curves.png           loss, lr and validation Acc@0.5 over steps
      train_summary.json   written last, when training finished
      eval.json            the latest `vgdistill eval` (or demo) results
      best/  last/         checkpoints: model.safetensors + config.json
      state/step-N/        Accelerate's resumable state (optimizer, scheduler, RNG, step),
                           plus the recipe it was trained with and a SHA-256 of every file
      logs/                trackers (TensorBoard, W&B, ...)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from vgdistill.atomic import LOCK_INSIDE, write_text
from vgdistill.training.metrics import METRICS_FILE

_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDir:
    """Paths of one run folder; creating the object touches nothing on disk."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def recipe(self) -> Path:
        """The resolved recipe of the run."""
        return self.root / "recipe.toml"

    @property
    def metrics(self) -> Path:
        """The metrics log (JSON lines)."""
        return self.root / METRICS_FILE

    @property
    def curves(self) -> Path:
        """The training-curves picture."""
        return self.root / "curves.png"

    @property
    def summary(self) -> Path:
        """The summary written when training finished."""
        return self.root / "train_summary.json"

    @property
    def eval(self) -> Path:
        """The latest evaluation results."""
        return self.root / "eval.json"

    @property
    def best(self) -> Path:
        """The checkpoint with the best validation Acc@0.5."""
        return self.root / "best"

    @property
    def last(self) -> Path:
        """The checkpoint of the last saved step."""
        return self.root / "last"

    @property
    def state_root(self) -> Path:
        """The folder of resumable states."""
        return self.root / "state"

    @property
    def logs(self) -> Path:
        """Where trackers write (TensorBoard: `tensorboard --logdir runs`)."""
        return self.root / "logs"

    def state(self, step: int) -> Path:
        """The resumable state saved at optimiser step `step`."""
        return self.state_root / f"step-{step}"

    @staticmethod
    def state_recipe(state: Path) -> Path:
        """The recipe a resumable state was trained with (inside the state folder)."""
        return state / "recipe.toml"

    @staticmethod
    def state_checksums(state: Path) -> Path:
        """The SHA-256 of every file of a resumable state (inside the state folder)."""
        return state / "checksums.json"

    def partial_state(self, step: int) -> Path:
        """Where the state of `step` is built before it is renamed into place."""
        return self.state_root / f".step-{step}.partial"

    def states(self) -> list[Path]:
        """Complete resumable states, oldest first (partial saves are dot-folders)."""
        if not self.state_root.is_dir():
            return []
        matches = ((_STEP_DIR.match(p.name), p) for p in self.state_root.iterdir())
        found = [(int(m.group(1)), p) for m, p in matches if m]
        return [p for _, p in sorted(found)]

    def is_run(self) -> bool:
        """True for a training run folder (as opposed to a bare checkpoint folder)."""
        from vgdistill.models.checkpoint import WEIGHTS

        return (
            self.root.is_dir()
            and not (self.root / WEIGHTS).exists()
            and any(p.exists() for p in (self.recipe, self.best, self.last))
        )

    def started(self) -> bool:
        """True when the folder holds more than a recipe.toml (a start that failed before
        training leaves only that, and the same command may then simply run again)."""
        if not self.root.is_dir():
            return bool(self.states())
        ignored = {self.recipe.name, LOCK_INSIDE}
        return any(p.name not in ignored for p in self.root.iterdir()) or bool(self.states())

    def checkpoint(self) -> Path | None:
        """The checkpoint that eval and predict use: best/, else last/; None if neither."""
        from vgdistill.models.checkpoint import WEIGHTS

        for folder in (self.best, self.last):
            if (folder / WEIGHTS).is_file():
                return folder
        return None

    def read_summary(self) -> dict[str, Any] | None:
        """The run's train_summary.json, or None when training has not finished."""
        return _read_json(self.summary)

    def read_eval(self) -> dict[str, Any] | None:
        """The per-split results of eval.json, or None when there is none."""
        results = (_read_json(self.eval) or {}).get("results")
        return results if isinstance(results, dict) else None

    def write_eval(self, record: dict[str, Any]) -> None:
        """Write eval.json: {"results": {split: metrics}, ...context}, atomically."""
        write_text(self.eval, json.dumps(record, indent=2) + "\n")


def discard(folder: Path) -> None:
    """Delete a folder by renaming it to a dot-name first: a kill during the delete leaves a
    folder that no command reads, never a torn one."""
    trash = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
