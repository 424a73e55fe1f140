"""Watching a training job: plain log lines when stderr is not a terminal, curves.png at each
validation, tracker project and run names, the mixed precision Accelerate asks for, and the
warning for a batch larger than the split."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from vgdistill.device import LAUNCH_PRECISION_ENV, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.toml"
# step, epoch, loss and its parts, lr, images/s, ETA: one line per train.log_every steps.
PLAIN = re.compile(
    r"^step (\d+)/6 epoch (\d+\.\d\d)/2 loss \d+\.\d{4} "
    r"\(dv \d+\.\d{3} dl \d+\.\d{3} giou \d+\.\d{3} l1 \d+\.\d{3}\) "
    r"lr \d\.\d\de[-+]\d\d \d+ img/s ETA (\d+:\d\d:\d\d|\?)$"
)


def _recipe(data: Path, tiny_sets, *extra: str):
    from vgdistill.recipe import load_recipe

    # 51 training rows at batch 16: 4 steps per epoch; 6 steps end mid-way through epoch 2.
    base = ("train.max_steps=6", "train.batch_size=16", "train.log_every=2")
    return load_recipe(RECIPE, tiny_sets(data, *base, *extra))


@pytest.fixture
def no_launcher(monkeypatch, tmp_path):
    """No `accelerate launch` around us and no `accelerate config` file."""
    monkeypatch.delenv(LAUNCH_PRECISION_ENV, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def test_plain_lines_when_stderr_is_not_a_terminal(tiny_data, tiny_sets, tmp_path, caplog):
    from vgdistill.training.student import TrainInterrupted, train

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="vgdistill"), pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTY_INTERACTIVE", "0")  # what a batch job's log file is
        with pytest.raises(TrainInterrupted):
            # Stopped after the first validation (step 4): curves.png is there already.
            train(_recipe(tiny_data, tiny_sets), out, stop_at_step=5, show_progress=True)
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
        assert not (out / "train_summary.json").exists()
        before = (out / "curves.png").stat().st_mtime_ns
        train(_recipe(tiny_data, tiny_sets), out, resume=True, show_progress=True)
    lines = [r.getMessage() for r in caplog.records]
    plain = [m for m in (PLAIN.match(line) for line in lines) if m]
    assert [(m.group(1), m.group(2)) for m in plain] == [
        ("2", "0.50"),
        ("4", "1.00"),
        ("5", "1.25"),  # the stop request syncs a window too
        ("6", "1.50"),  # after the resume
    ]
    assert any(line.startswith("step 4: val Acc@0.5") for line in lines)
    assert any(line.startswith("step 6: val Acc@0.5") for line in lines)
    assert (out / "curves.png").stat().st_mtime_ns > before


def test_no_plain_lines_beside_a_live_bar(tiny_data, tiny_sets, tmp_path, caplog, monkeypatch):
    from vgdistill.training.student import train

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal: the live bar shows instead
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with caplog.at_level(logging.INFO, logger="vgdistill"):
        train(_recipe(tiny_data, tiny_sets), tmp_path / "run", show_progress=True)
    assert not [r for r in caplog.records if PLAIN.match(r.getMessage())]
    assert any("val Acc@0.5" in r.getMessage() for r in caplog.records)


def test_tensorboard_writes_under_the_project_in_the_run_folder(tiny_data, tiny_sets, tmp_path):
    from vgdistill.training.student import train

    r = _recipe(tiny_data, tiny_sets, 'train.trackers=["tensorboard"]', 'train.project="refcoco"')
    train(r, tmp_path / "run-a", show_progress=False)
    events = list((tmp_path / "run-a" / "logs" / "refcoco").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_trackers_are_given_the_run_name():
    from vgdistill.training.trackers import tracker_init_kwargs

    logs = Path("runs/r50-a/logs")
    kwargs = tracker_init_kwargs(["tensorboard", "wandb", "mlflow"], "r50-a", logs)
    assert kwargs == {
        "wandb": {"name": "r50-a", "dir": str(logs)},
        "mlflow": {"run_name": "r50-a"},
    }


def test_auto_precision_takes_what_accelerate_says(monkeypatch, tmp_path, no_launcher):
    # Nothing configured: bf16 only on a GPU that has it.
    assert resolve_precision("auto", cuda=False) == ("no", "auto: no bf16 GPU")
    assert resolve_precision("bf16", cuda=False) == ("bf16", "train.mixed_precision")
    # `accelerate config` saved a choice ...
    config = tmp_path / "hf-home" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\n")
    assert resolve_precision("auto", cuda=False) == ("bf16", f"auto: accelerate config {config}")
    # ... and `accelerate launch --mixed_precision` comes first.
    monkeypatch.setenv(LAUNCH_PRECISION_ENV, "fp16")
    assert resolve_precision("auto", cuda=True) == ("fp16", "auto: accelerate launch")
    assert resolve_precision("auto", cuda=False) == (
        "no",
        "auto: accelerate launch; fp16 needs a GPU",
    )
    # An explicit recipe value wins, and says over what.
    assert resolve_precision("no", cuda=True) == (
        "no",
        "train.mixed_precision, over 'fp16' from accelerate launch",
    )


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate fixes one precision per process: start and leave with none fixed."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_auto_precision_trains_as_launched(
    tiny_data, tiny_sets, tmp_path, caplog, monkeypatch, no_launcher, fresh_accelerate_state
):
    from vgdistill.training.student import train

    monkeypatch.setenv(LAUNCH_PRECISION_ENV, "bf16")  # accelerate launch --mixed_precision bf16
    r = _recipe(tiny_data, tiny_sets, 'train.mixed_precision="auto"', "train.max_steps=2")
    with caplog.at_level(logging.INFO, logger="vgdistill"):
        summary = train(r, tmp_path / "run", show_progress=False)
    assert summary["step"] == 2
    assert "precision bf16 (auto: accelerate launch)" in caplog.text


def test_gpu_recipes_leave_the_precision_to_accelerate():
    from vgdistill.recipe import load_recipe

    assert load_recipe(ROOT / "recipes" / "r50.toml").train.mixed_precision == "auto"


def test_a_batch_larger_than_the_split_warns_once(tiny_data, tiny_sets, tmp_path, caplog):
    from vgdistill.training.student import train

    r = _recipe(tiny_data, tiny_sets, "train.batch_size=100", "train.max_steps=2")
    with caplog.at_level(logging.WARNING, logger="vgdistill"):
        train(r, tmp_path / "run", show_progress=False)
    warned = [r.getMessage() for r in caplog.records if "train.batch_size" in r.getMessage()]
    assert warned == [
        "train.batch_size 100 x 1 process(es) is more than the 51 rows of the 'train' split: "
        "every step takes at most 51 rows per process"
    ]
