"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through Accelerate: checking the names a
recipe gives, and what each is started with (project, run name, folder, configuration)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vgdistill.errors import VGError
from vgdistill.recipe import Recipe, flat_keys

# The keyword each tracker's own init takes for a run's display name (Accelerate passes the
# project name positionally). TensorBoard has no names: its run is the folder it writes to.
RUN_NAME_ARGS = {"wandb": "name", "mlflow": "run_name", "clearml": "task_name"}


def check_trackers(names: list[str]) -> None:
    """VGError for a tracker Accelerate does not know, or TensorBoard when not installed."""
    from accelerate.utils import LoggerType

    valid = {t.value for t in LoggerType}
    for name in names:
        if name not in valid:
            raise VGError(
                f"train.trackers: unknown tracker {name!r}; valid: {', '.join(sorted(valid))}"
            )
        if name == "tensorboard":
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                raise VGError(
                    "train.trackers has 'tensorboard' but it is not installed: "
                    "pip install tensorboard (or remove it from train.trackers)"
                )


def tracker_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe flattened to scalars (TensorBoard hparams accept no lists or dicts)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        for k, v in flat_keys(recipe.to_dict()).items()
    }


def tracker_init_kwargs(names: list[str], run_name: str, logs: Path) -> dict[str, dict]:
    """Accelerate's init_kwargs: each tracker that takes a run name gets `run_name`, and W&B
    keeps its files in the run's `logs` folder (not in the working directory)."""
    kwargs: dict[str, dict] = {}
    for name in names:
        if name in RUN_NAME_ARGS:
            kwargs[name] = {RUN_NAME_ARGS[name]: run_name}
    if "wandb" in kwargs:
        kwargs["wandb"]["dir"] = str(logs)
    return kwargs


def start_trackers(acc: Any, recipe: Recipe, run_name: str, logs: Path) -> None:
    """Start the recipe's trackers on `acc` under train.project, the run named `run_name`."""
    t = recipe.train
    if not t.trackers:
        return
    if acc.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)
    acc.init_trackers(
        t.project,
        config=tracker_config(recipe),
        init_kwargs=tracker_init_kwargs(list(t.trackers), run_name, logs),
    )
