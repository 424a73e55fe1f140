"""Killed and racing processes: nothing finished is lost, nothing half-written is accepted.

- kill -9 while a training run writes its checkpoints: last/ still loads, every state/step-N
  folder is complete, and the run resumes from the newest one;
- kill -9 while `prepare` writes: no dataset later commands accept appears, a dataset that was
  there before is intact, and the lock does not outlive the process;
- two `prepare` runs into one --out: the second is refused while the first writes, the first
  finishes whole;
- the prepared folder deleted while a command reads it;
- `atomic.build_dir` replaces a folder without a moment where it is missing.
Killing `ablate` mid-grid is covered by tests/test_ablate.py
(test_ablate_killed_after_first_variant_resumes_without_retraining): the finished variant is
kept and not retrained.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from .conftest import RECIPE, ROOT

runner = CliRunner()
SEED = int(os.environ.get("VGD_FAULT_SEED", time.time_ns() % 10_000))


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m vgdistill ARGS` in its own process group, output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "vgdistill", *args],
            cwd=log.parent,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (no handler, no cleanup) and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, poll: float = 0.002) -> bool:
    """Poll `predicate` until it holds; False if the process ended or time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


def _hidden(folder: Path, suffix: str) -> list[Path]:
    """Dot-named work folders beside/inside `folder` ending in `suffix`."""
    try:
        return [p for p in folder.iterdir() if p.name.startswith(".") and suffix in p.name]
    except FileNotFoundError:
        return []


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tiny_data, tiny_sets, tmp_path):
    """SIGKILL a run (save every step) while it writes a checkpoint; everything stays usable."""
    from vgdistill.models.checkpoint import load_checkpoint
    from vgdistill.recipe import load_recipe
    from vgdistill.training.rundir import RunDir
    from vgdistill.training.student import TrainInterrupted, train

    rng = random.Random(SEED)
    sets = tiny_sets(tiny_data, "train.max_steps=500", "train.save_every=1", "train.keep=2")
    run = tmp_path / "run"
    argv = ["train", str(RECIPE), "--out", str(run), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    proc = _spawn(argv, tmp_path / "train.log")
    try:
        # Let a few checkpoints complete, then kill the moment the next write has begun.
        skip = rng.randint(1, 4)
        ready = _wait_for(lambda: bool(RunDir(run).states()) and (run / "last").is_dir(), proc, 240)
        assert ready, (tmp_path / "train.log").read_text()[-3000:]
        for _ in range(skip):
            seen = {p.name for p in RunDir(run).states()}
            _wait_for(lambda s=seen: {p.name for p in RunDir(run).states()} != s, proc, 60)
        writing = _wait_for(
            lambda: bool(_hidden(run / "state", ".partial") or _hidden(run, ".partial")),
            proc,
            60,
            poll=0.0005,
        )
        time.sleep(rng.uniform(0, 0.02))
        assert writing and proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        _kill(proc)
    print(f"seed {SEED}: killed after {skip} more saves, mid-write: {writing}")

    # last/ loads (a killed write never takes the previous checkpoint with it).
    model, recipe = load_checkpoint(run / "last")
    assert recipe.distill.modality == "none"
    load_checkpoint(run)  # the run folder resolves to best/ or last/ and loads too

    # Every state/step-N that exists is complete; half-written ones are dot-folders.
    states = RunDir(run).states()
    assert states, "no resumable state survived"
    names = [{f.name for f in s.iterdir()} for s in states]
    for folder, files in zip(states, names, strict=True):
        assert {"model.safetensors", "optimizer.bin"} <= files, (folder, files)
        assert files == names[-1], (folder, files, names[-1])
        assert all((folder / f).stat().st_size > 0 for f in files), folder
    from safetensors.torch import load_file

    for folder in states:
        load_file(str(folder / "model.safetensors"))

    # The newest state resumes: one more step, then a clean stop.
    newest = int(states[-1].name.split("-")[1])
    with pytest.raises(TrainInterrupted):
        train(load_recipe(RECIPE, sets), run, resume=True, stop_at_step=newest + 1,
              show_progress=False)  # fmt: skip
    assert int(RunDir(run).states()[-1].name.split("-")[1]) == newest + 1


# ----------------------------------------------------------------------------- prepare


def _prepare_args(out: Path, rows: int, seed: int) -> list[str]:
    return ["prepare", "shapes", "--rows", str(rows), "--seed", str(seed), "--image-size", "64",
            "--out", str(out), "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_kill_during_prepare_leaves_no_accepted_dataset(tiny_data, tiny_ckpt, tmp_path):
    """Two prepares killed mid-write: one into a fresh folder, one replacing a dataset."""
    from vgdistill.data.prepare import load_prepared, read_manifest
    from vgdistill.errors import VGError

    rng = random.Random(SEED)
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    shutil.copytree(tiny_data, kept)
    old = read_manifest(kept)
    procs = {
        fresh: _spawn(_prepare_args(fresh, 4000, 1), tmp_path / "fresh.log"),
        kept: _spawn(_prepare_args(kept, 4000, 2), tmp_path / "kept.log"),
    }
    swapping = []

    def kill_kept_mid_swap() -> None:
        """kept: killed the moment its new folder starts being written beside the old one."""

        def partial() -> bool:
            return any(p.name.endswith(".partial") for p in _hidden(tmp_path, "kept."))

        if _wait_for(partial, procs[kept], 120, poll=0.0005):
            swapping.append(True)
            _kill(procs[kept])

    try:
        t = threading.Thread(target=kill_kept_mid_swap)
        t.start()
        # fresh: killed at a random moment while its images are written.
        # (prepare writes its tables straight into its .partial build folder beside --out)
        def building() -> bool:
            return any(p.name.startswith(".fresh.") for p in _hidden(tmp_path, ".partial"))

        assert _wait_for(building, procs[fresh], 120)
        time.sleep(rng.uniform(0.0, 2.0))
        _kill(procs[fresh])
        t.join(timeout=180)
    finally:
        for p in procs.values():
            _kill(p)
    logs = {k: (tmp_path / f"{k.name}.log").read_text()[-2000:] for k in procs}
    assert swapping and procs[kept].returncode == -signal.SIGKILL, logs[kept]

    # The dataset that was there before is intact and still the old one.
    assert read_manifest(kept)["fingerprint"] == old["fingerprint"]
    assert len(load_prepared(kept)["train"]) == old["counts"]["train"]["kept"]

    # The killed fresh build left nothing a command accepts, or (killed between its final
    # rename and its exit) a whole dataset.
    try:
        whole = load_prepared(fresh)
    except VGError:
        whole = None
    if whole is not None:
        assert len(whole["train"]) == read_manifest(fresh)["counts"]["train"]["kept"] > 3000
    else:
        result = runner.invoke(_app(), ["eval", str(tiny_ckpt), "--data", str(fresh)])
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
        # ...and no stale lock: the next prepare into it just works.
        result = runner.invoke(_app(), _prepare_args(fresh, 8, 0))
        assert result.exit_code == 0, result.output
        assert len(load_prepared(fresh)["train"]) > 0


@pytest.mark.slow
def test_two_prepares_into_one_out_never_corrupt_it(tmp_path):
    """While one prepare writes --out, a second (same or other args) is refused; the first
    finishes whole, and a later identical run reuses it."""
    from vgdistill.data.prepare import load_prepared, read_manifest

    out = tmp_path / "shared"
    first = _spawn(_prepare_args(out, 3000, 5), tmp_path / "first.log")
    try:
        holding = _wait_for(lambda: bool(_hidden(tmp_path, ".partial")), first, 120)
        assert holding, (tmp_path / "first.log").read_text()[-2000:]
        same = runner.invoke(_app(), _prepare_args(out, 3000, 5))
        other = runner.invoke(_app(), _prepare_args(out, 100, 6))
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        _kill(first)
    for second in (same, other):
        assert second.exit_code == 2, second.output
        (line,) = second.stderr.strip().splitlines()
        assert "being written by another `vgdistill prepare`" in line
    manifest = read_manifest(out)
    assert manifest["args"]["seed"] == 5 and manifest["args"]["rows"] == 3000
    data = load_prepared(out)
    assert sum(len(data[s]) for s in data) == 3000
    again = runner.invoke(_app(), _prepare_args(out, 3000, 5))
    assert again.exit_code == 0 and "up to date" in again.stdout, again.output


# ----------------------------------------------------------------------------- reading


def test_prepared_folder_deleted_mid_read(tiny_data, tiny_ckpt, tmp_path, monkeypatch):
    """`eval` whose dataset folder is deleted after the first sample: finishes with the
    memory-mapped data or stops with one line, never a crash; afterwards it is a clear error."""
    import vgdistill.data.loader as loader

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    original = loader.GroundingDataset.__getitem__
    deleted = []

    def getitem(self, index):
        if not deleted:
            shutil.rmtree(data)
            deleted.append(index)
        return original(self, index)

    monkeypatch.setattr(loader.GroundingDataset, "__getitem__", getitem)
    result = runner.invoke(
        _app(), ["eval", str(tiny_ckpt), "--data", str(data), "--split", "val", "--split", "testA"]
    )
    assert deleted and not data.exists()
    assert "Traceback" not in result.output and result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    monkeypatch.undo()
    result = runner.invoke(_app(), ["eval", str(tiny_ckpt), "--data", str(data)])
    assert result.exit_code == 2 and "does not exist" in result.stderr, result.output


# ----------------------------------------------------------------------------- atomic swap


def test_build_dir_replaces_a_folder_without_a_gap(tmp_path):
    """Readers polling a checkpoint folder while it is rewritten 150 times never miss it."""
    from vgdistill import atomic

    target = tmp_path / "last"
    with atomic.build_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"0")
    misses, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                (target / "model.safetensors").read_bytes()
            except FileNotFoundError:
                misses.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(150):
            with atomic.build_dir(target) as tmp:
                (tmp / "model.safetensors").write_bytes(str(i).encode())
    finally:
        stop.set()
        t.join()
    assert (target / "model.safetensors").read_bytes() == b"149"
    assert not misses, f"the folder was missing {len(misses)} times while being replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no leftovers


def test_build_dir_recovers_a_swap_killed_half_way(tmp_path):
    """A write killed between its two renames (old moved aside, new not yet in) loses
    nothing: the next write of that folder puts the old one back first."""
    from vgdistill import atomic

    target = tmp_path / "last"
    aside = tmp_path / ".last.old"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"previous")
    assert atomic.recover(target) and (target / "model.safetensors").read_bytes() == b"previous"
    assert not aside.exists()


def _app():
    from vgdistill.cli.app import app

    return app
