"""Shared servers, symlinks, read-only and full disks, leftovers, a closed stdout: each
command on the real thing.

- a symlinked --out takes the same lock as its target, and writes land in the target;
- read-only output places (a read-only bind mount) are refused up front by every writing
  command, `eval` of a read-only run shows its results and says eval.json was not saved,
  and a writable run folder inside a read-only parent trains (its lock goes inside it);
- a full disk (a size-limited tmpfs) stops training and prepare with one line, removes the
  unfinished files and loses nothing written before; the run then resumes to the end;
- leftovers of killed commands are removed by the next command that owns the folder;
- `vgdistill train ... | head` keeps the finished run's exit status.

Mounts are made in a private namespace (tests/robustness/_sandbox.py); where the machine
does not allow that, those tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from . import _files as F
from ._sandbox import Sandbox, available
from .conftest import RECIPE, ROOT

runner = CliRunner()
needs_mounts = pytest.mark.skipif(
    not available(), reason="needs private mount namespaces (unshare --user --mount)"
)


def _app():
    from vgdistill.cli.app import app

    return app


def _recipe(tmp: Path, data: Path, *sets: str) -> list[str]:
    """A tiny distillation-free recipe file on `data` plus its --set options."""
    path = tmp / "r.toml"
    body = f'extends = "{RECIPE}"\n[data]\npath = "{data}"\n[distill]\nmodality = "none"\n'
    path.write_text(body)
    extra = ["train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0",
             'eval.splits=["val"]', "eval.batch_size=4", *sets]  # fmt: skip
    return [str(path)] + [a for s in extra for a in ("--set", s)]


def _one_line(outcome, pattern: str) -> None:
    """Exit 2 ending with one `error:` line matching `pattern` (a training run's progress
    lines may come before it), and no traceback."""
    import re

    assert outcome.code == 2, (outcome.code, outcome.err[-2000:])
    assert "Traceback" not in outcome.err, outcome.err[-2000:]
    errors = [line for line in outcome.lines if line.startswith("error: ")]
    assert errors == outcome.lines[-1:], outcome.err[-2000:]
    assert re.search(pattern, errors[0]), (pattern, errors[0])


def _leftovers(root: Path) -> list[str]:
    """Temporaries anywhere under `root` (a killed or failed write's remains)."""
    return [
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if p.name.endswith((".partial", ".tmp", ".deleting")) or ".cache." in p.name
    ]


# ----------------------------------------------------------------------------- symlinks


def test_symlinked_out_shares_the_lock_and_writes_the_target(tiny_data, tmp_path):
    """`--out link` while `--out target` trains is refused; prepare through a link writes the
    dataset where the link points and leaves the link a link."""
    from vgdistill import atomic
    from vgdistill.data.prepare import load_prepared

    real = tmp_path / "runs" / "x"
    real.mkdir(parents=True)
    link = tmp_path / "link-to-x"
    link.symlink_to(real)
    with atomic.exclusive(real, "the first training"):
        result = runner.invoke(
            _app(), ["train", *_recipe(tmp_path, tiny_data), "--out", str(link), "--no-progress"]
        )
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "link-to-x is being written by another training process" in line
    assert list(real.iterdir()) == []  # nothing was written by the refused run

    (tmp_path / "store").mkdir()
    data_link = tmp_path / "data"
    data_link.symlink_to(tmp_path / "store" / "shapes")
    args = ["prepare", "shapes", "--rows", "8", "--image-size", "32", "--no-progress"]
    for extra in ([], ["--force"]):
        result = runner.invoke(_app(), [*args, "--out", str(data_link), *extra])
        assert result.exit_code == 0, result.output
        assert data_link.is_symlink() and (tmp_path / "store" / "shapes" / "prepare.json").exists()
    assert sum(len(s) for s in load_prepared(data_link).values()) == 8
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".shapes.lock", "shapes"]


# ----------------------------------------------------------------------------- read-only


@needs_mounts
@pytest.mark.slow
def test_read_only_places(tiny_data, tiny_run, tmp_path):
    """Every writing command refuses a read-only --out before doing any work; eval of a
    read-only run prints its table and says eval.json was not saved (exit 0); a writable run
    folder whose parent is read-only trains, locked from inside, and resumes."""
    ro = tmp_path / "ro"
    shutil.copytree(tiny_run, ro / "run")
    (ro / "rw").mkdir()
    image = F.rgb_png(ro / "i.png")
    pth = F.other_model_pth(ro / "cls.pth")
    recipe = _recipe(tmp_path, tiny_data)
    teacher = [*recipe, "--set", 'distill.teacher_arch="vgd-tiny-clip"', "--set",
               'distill.teacher_pretrained=""']  # fmt: skip
    box = Sandbox(tmp_path).read_only(ro).tmpfs(ro / "rw", "256m")
    box.vg("train", "train", *recipe, "--out", str(ro / "new"), "--no-progress")
    box.vg("prepare", "prepare", "shapes", "--rows", "8", "--out", str(ro / "data"))
    box.vg("detector", "detector", *recipe, "--out", str(ro / "det"))
    box.vg("teacher", "teacher", *teacher, "--out", str(ro / "teacher"), "--epochs", "1")
    box.vg("import", "import", "transvg", str(pth), "--out", str(ro / "imported"))
    box.vg("ablate", "ablate", *recipe, "--seeds", "1", "--out", str(ro / "abl"))
    box.vg("demo", "demo", "--out", str(ro / "demo"))
    box.vg("predict", "predict", str(ro / "run"), str(image), "a box", "--out", str(ro / "p.png"))
    box.vg("eval-json", "eval", str(ro / "run"), "--json", str(ro / "e.json"))
    box.vg("eval", "eval", str(ro / "run"), "--data", str(tiny_data), "--split", "val")
    box.vg("train-rw", "train", *recipe, "--out", str(ro / "rw"), "--no-progress")
    box.sh(f"ls -a {ro / 'rw'} > {tmp_path / 'rw-listing'}")
    box.vg("resume-rw", "train", *recipe, "--out", str(ro / "rw"), "--resume", "--no-progress")
    box.run()

    for name in ("train", "prepare", "detector", "teacher", "import", "ablate", "demo"):
        _one_line(box.result(name), r"cannot write --out .*ro.*: .*ro is on a read-only file")
    _one_line(box.result("predict"), r"cannot write --out .*p\.png: .* read-only file system")
    _one_line(box.result("eval-json"), r"cannot write --json .*e\.json: .* read-only file")
    evaluated = box.result("eval")
    assert evaluated.code == 0, evaluated.err
    assert "Acc@0.5" in evaluated.out and "val" in evaluated.out
    assert evaluated.lines == [
        f"warning: could not save eval.json in {ro / 'run'}: read-only file system"
    ], evaluated.err
    assert not (ro / "run" / "eval.json").exists()

    trained = box.result("train-rw")
    assert trained.code == 0, trained.err[-2000:]
    listing = (tmp_path / "rw-listing").read_text().split()
    assert ".vgdistill.lock" in listing and "train_summary.json" in listing, listing
    resumed = box.result("resume-rw")
    assert resumed.code == 0 and "already finished" in resumed.err, resumed.err[-2000:]


# ----------------------------------------------------------------------------- full disk


@needs_mounts
@pytest.mark.slow
def test_full_disk_during_training_then_resume(tiny_data, tmp_path):
    """A run on a 90 MB disk that needs more: one line naming the disk, no unfinished state
    or checkpoint left, every saved state whole; with room again it resumes to the end."""
    full = tmp_path / "full"
    recipe = _recipe(tmp_path, tiny_data, "train.max_steps=24", "train.save_every=1",
                     "train.keep=2")  # fmt: skip
    box = Sandbox(tmp_path).tmpfs(full, "90m")
    box.vg("train", "train", *recipe, "--out", str(full / "run"), "--no-progress")
    box.sh(f"cp -a {full / 'run'} {tmp_path / 'after-fail'}")
    box.sh(f"mount -o remount,size=400m {full}")
    box.vg("resume", "train", *recipe, "--out", str(full / "run"), "--resume", "--no-progress")
    box.sh(f"cp -a {full / 'run'} {tmp_path / 'finished'}")
    box.run()

    _one_line(box.result("train"), rf"no space left on the disk holding {full}.* free\).*--resume")
    after = tmp_path / "after-fail"
    assert _leftovers(after) == []
    from vgdistill.models.checkpoint import load_checkpoint
    from vgdistill.training.checkpoints import _verify_state
    from vgdistill.training.rundir import RunDir

    run = RunDir(after)
    assert run.states(), sorted(p.name for p in after.rglob("*"))
    for state in run.states():
        _verify_state(run, state, "")  # every file there and as saved
    load_checkpoint(after / "last")
    resumed = box.result("resume")
    assert resumed.code == 0, resumed.err[-2000:]
    summary = json.loads((tmp_path / "finished" / "train_summary.json").read_text())
    assert summary["finished"] and summary["step"] == 24, summary
    assert _leftovers(tmp_path / "finished") == []


@needs_mounts
@pytest.mark.slow
def test_full_disk_during_prepare_keeps_the_old_dataset(tmp_path):
    """Replacing a dataset on a disk too small for the new one: one line, no partial folder
    or image cache left beside it, the old dataset still there and unchanged."""
    full = tmp_path / "full"
    small = ["prepare", "shapes", "--rows", "40", "--image-size", "64", "--no-progress"]
    big = ["prepare", "shapes", "--rows", "3000", "--seed", "1", "--image-size", "64",
           "--no-progress"]  # fmt: skip
    box = Sandbox(tmp_path).tmpfs(full, "3m")
    box.vg("small", *small, "--out", str(full / "data"))
    box.vg("big", *big, "--out", str(full / "data"))
    box.sh(f"ls -a {full} > {tmp_path / 'listing'}")
    box.sh(f"cp -a {full / 'data'} {tmp_path / 'data'}")
    box.run()

    assert box.result("small").code == 0, box.result("small").err[-2000:]
    _one_line(box.result("big"), rf"no space left on the disk holding {full}")
    assert sorted((tmp_path / "listing").read_text().split()) == [".", "..", ".data.lock", "data"]
    from vgdistill.data.prepare import load_prepared, read_manifest

    assert read_manifest(tmp_path / "data")["args"]["rows"] == 40
    assert sum(len(s) for s in load_prepared(tmp_path / "data").values()) == 40


# ----------------------------------------------------------------------------- leftovers


def test_leftovers_of_killed_commands_are_removed_by_the_next_one(
    tiny_data, tiny_run, tmp_path, caplog
):
    """What kill -9 leaves (a checkpoint being written, a state being saved or deleted, a
    summary's temp file; a dataset build and its image cache) goes with the next command
    that owns the folder; what was finished stays."""
    from vgdistill.training.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    states = RunDir(run).states()
    shutil.copytree(run / "last", run / ".last.k1ll3d_9.partial")
    shutil.copytree(states[-1], run / "state" / ".step-99.partial")
    shutil.copytree(states[-1], run / "state" / ".step-1.deleting")
    (run / ".train_summary.json.abcdefgh.tmp").write_text("{")
    recipe = tmp_path / "r.toml"
    shutil.copy(states[-1] / "recipe.toml", recipe)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".partial" not in str(p)
                    and ".deleting" not in str(p) and not p.name.endswith(".tmp"))  # fmt: skip
    with caplog.at_level("INFO", logger="vgdistill"):
        result = runner.invoke(
            _app(), ["train", str(recipe), "--out", str(run), "--resume", "--no-progress"]
        )
    assert result.exit_code == 0, result.output
    assert _leftovers(run) == []
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert "removed 4 leftover(s) of an interrupted command" in caplog.text

    data = tmp_path / "pk"
    shutil.copytree(tiny_data, data)
    (tmp_path / ".pk.zz9yy8xx.partial" / "train").mkdir(parents=True)
    (tmp_path / ".pk.cache.q1w2e3r4").mkdir()
    (tmp_path / ".pk.cache.q1w2e3r4" / "img.png").write_bytes(b"\0" * 4096)
    args = ["prepare", "shapes", "--rows", "60", "--image-size", "64", "--no-progress"]
    result = runner.invoke(_app(), [*args, "--out", str(data), "--force"])  # a re-run that writes
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pk")) == [".pk.lock"]


# ----------------------------------------------------------------------------- stdout


@pytest.mark.slow
def test_closed_stdout_keeps_a_finished_runs_exit_status(tiny_data, tmp_path):
    """`vgdistill train ... | head` with head gone before the run ends: the run finishes
    and exits 0 (before: exit 1 from a broken pipe on the final line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = ["train", *_recipe(tmp_path, tiny_data), "--out", str(tmp_path / "run"),
            "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "vgdistill", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, err[-2000:]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["finished"]
