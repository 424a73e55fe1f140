"""Filesystem faults at the write points themselves: file modes under the umask, the output
lock (real path, placement), unwritable outputs, a full disk (ENOSPC injected where the bytes
are written), leftovers of killed commands, SHA-256 checks of weights and resumable states,
the resume check without recipe.toml, and a closed stdout.

The same faults on real read-only and size-limited mounts, through the CLI, are in
tests/robustness/test_fs_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vgdistill import atomic
from vgdistill.errors import DiskFullError, VGError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.toml"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree_modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of `root` and everything under it."""
    found = {".": _mode(root)}
    for p in root.rglob("*"):
        found[p.relative_to(root).as_posix()] = _mode(p)
    return found


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one comes back after it."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


def _tiny_model():
    from vgdistill.models.factory import build_model
    from vgdistill.recipe import load_recipe

    recipe = load_recipe(RECIPE, ['distill.modality="none"'])
    torch.manual_seed(0)
    return build_model(recipe, load_weights=False), recipe


# ------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027])
def test_outputs_honour_the_umask(mask, umask, tmp_path):
    """Atomic files, atomic folders, a checkpoint and the lock file get 0666/0777 & ~umask
    (mkstemp/mkdtemp alone would make every one of them 0600/0700)."""
    umask(mask)
    model, recipe = _tiny_model()
    atomic.write_text(tmp_path / "eval.json", "{}")
    with atomic.build_dir(tmp_path / "data") as tmp:
        (tmp / "split").mkdir()
        (tmp / "split" / "rows.arrow").write_bytes(b"x")
    from vgdistill.models.checkpoint import save_checkpoint

    with atomic.exclusive(tmp_path / "run"):
        save_checkpoint(model, recipe, tmp_path / "run" / "last")
    files, dirs = 0o666 & ~mask, 0o777 & ~mask
    assert _mode(tmp_path / "eval.json") == files
    assert _tree_modes(tmp_path / "data") == {".": dirs, "split": dirs, "split/rows.arrow": files}
    assert _tree_modes(tmp_path / "run" / "last") == {
        ".": dirs,
        "model.safetensors": files,
        "config.json": files,
    }
    assert _mode(tmp_path / ".run.lock") == files
    assert atomic.umask() == mask  # reading the umask leaves it as it was


# ------------------------------------------------------------------------------ locks


def test_lock_is_keyed_on_the_real_path(tmp_path):
    """--out x and --out link-to-x are one folder: the second writer is refused."""
    real = tmp_path / "runs" / "x"
    real.mkdir(parents=True)
    link = tmp_path / "link-to-x"
    link.symlink_to(real)
    refused = pytest.raises(VGError, match=r"link-to-x is being written by another `train`")
    with atomic.exclusive(real):
        with refused, atomic.exclusive(link, "another `train`"):
            pass
        with atomic.exclusive(tmp_path / "runs" / "y"):  # another folder is not blocked
            pass
    with atomic.exclusive(link):  # released: the link's writer now gets it
        pass
    assert not (tmp_path / ".link-to-x.lock").exists()
    assert (real.parent / ".x.lock").exists()


def _chmod_protects(tmp: Path) -> bool:
    """Whether a chmod a-w folder stops this process (not for root with CAP_DAC_OVERRIDE)."""
    probe = tmp / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        return not os.access(probe, os.W_OK)
    finally:
        probe.chmod(0o755)


def test_lock_inside_a_folder_whose_parent_is_read_only(tmp_path):
    """A writable output folder in a read-only parent is locked from inside (chmod variant;
    the read-only mount variant runs in tests/robustness/test_fs_faults.py)."""
    if not _chmod_protects(tmp_path):
        pytest.skip("this process writes into chmod a-w folders anyway (root)")
    parent = tmp_path / "shared"
    run = parent / "run"
    run.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        with atomic.exclusive(run):
            assert (run / atomic.LOCK_INSIDE).exists()
            with pytest.raises(VGError, match="is being written by"), atomic.exclusive(run):
                pass
        with pytest.raises(VGError, match=r"permission denied"):
            atomic.check_writable(parent / "new")
        with pytest.raises(VGError, match=r"permission denied"):
            atomic.check_writable(run, whole=True)  # swapped in whole: needs the parent
    finally:
        parent.chmod(0o755)


def test_outputs_that_are_files_or_under_files_are_refused(tmp_path):
    """--out naming an existing file (or a path below one) fails with one clear line."""
    afile = tmp_path / "notes.txt"
    afile.write_text("precious")
    with pytest.raises(VGError, match=r"--out .*notes\.txt exists and is not a folder"):
        atomic.check_writable(afile)
    with pytest.raises(VGError, match=r"notes\.txt is a file, not a folder"):
        atomic.check_writable(afile / "run")
    with pytest.raises(VGError, match=r"--json .* is a folder; give a file name"):
        atomic.check_file_out(tmp_path, "--json")
    with pytest.raises(VGError, match="exists and is not a folder"), atomic.exclusive(afile):
        pass
    atomic.check_file_out(tmp_path / "new" / "out.json")  # created on write: fine
    assert afile.read_text() == "precious"


# ------------------------------------------------------------------------------ full disk


def test_full_disk_in_an_atomic_file_write(tmp_path, monkeypatch):
    """ENOSPC from fsync (where a full disk shows on many filesystems): one DiskFullError
    naming the folder and the size, the temp file gone, the previous file intact."""
    target = tmp_path / "eval.json"
    atomic.write_text(target, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(DiskFullError) as info:
        atomic.write_bytes(target, b"x" * 5000)
    message = str(info.value)
    assert f"no space left on the disk holding {tmp_path}" in message
    assert "needs about 4.9 KB" in message and "free" in message
    assert "nothing written before it was lost" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    assert target.read_text() == "old"


def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    """safetensors' own ENOSPC error mid-write of last/: DiskFullError with the size the
    weights need, no `.last.*.partial` left, the previous last/ still loads."""
    import safetensors.torch

    from vgdistill.models.checkpoint import load_checkpoint, save_checkpoint

    model, recipe = _tiny_model()
    run = tmp_path / "run"
    save_checkpoint(model, recipe, run / "last")
    before = (run / "last" / "model.safetensors").read_bytes()
    real_save = safetensors.torch.save_file

    def half_then_full(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])  # what got written
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(DiskFullError, match=r"disk holding .*run \(this write needs about"):
        save_checkpoint(model, recipe, run / "last")
    assert sorted(p.name for p in run.iterdir()) == ["last"]
    assert (run / "last" / "model.safetensors").read_bytes() == before
    monkeypatch.undo()
    load_checkpoint(run / "last")


def test_full_disk_in_a_torch_write_without_errno(tmp_path, monkeypatch):
    """torch's zip writer says only 'unexpected pos': a full disk when the disk it wrote to
    has no space left at that moment, an ordinary error otherwise."""
    from vgdistill import errors

    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(errors, "free_bytes", lambda folder: 4096)
    assert errors.is_disk_full(torn, tmp_path)
    assert not errors.is_disk_full(torn)  # without knowing the folder it cannot tell
    monkeypatch.setattr(errors, "free_bytes", lambda folder: 50 * 2**30)
    assert not errors.is_disk_full(torn, tmp_path)
    wrapped = RuntimeError("DatasetGenerationError: An error occurred while generating")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.arrow"))
    assert errors.is_disk_full(wrapped) and errors.full_path(wrapped) == tmp_path


def test_cli_turns_a_buried_enospc_into_one_line(tmp_path, capsys):
    """An ENOSPC behind another library's exception becomes one line, exit 2, naming the
    folder of the file it was writing."""
    import typer

    from vgdistill.cli.common import friendly

    @friendly
    def command() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.arrow"))
        except OSError as e:
            raise RuntimeError("DatasetGenerationError") from e

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" not in err
    assert f"no space left on the disk holding {tmp_path}" in " ".join(err.split())


def test_full_disk_inside_a_locked_folder_names_it(tmp_path):
    """An ENOSPC no write point wrapped (a metrics line, a tracker) names the output folder."""
    full = pytest.raises(DiskFullError, match=rf"disk holding {tmp_path / 'run'}")
    with full, atomic.exclusive(tmp_path / "run"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------ leftovers


def test_the_lock_holder_removes_leftovers_of_killed_commands(tmp_path, caplog):
    """Temporaries of killed writes beside and inside the folder (and in the subfolders it
    names) go; the user's own dot-files and the folders of other outputs stay."""
    out = tmp_path / "pk"
    (out / "state").mkdir(parents=True)
    leftovers = [
        tmp_path / ".pk.a1b2c3d4.partial",  # build_dir of pk, killed
        tmp_path / ".pk.cache.x_9y8z7w",  # prepare's image cache of pk
        out / ".last.q1w2e3r4.partial",  # a checkpoint write, killed
        out / ".train_summary.json.abcdefgh.tmp",  # write_text, killed
        out / "state" / ".step-54.partial",  # a resumable state, killed mid-save
        out / "state" / ".step-12.deleting",  # an old state, killed mid-delete
    ]
    kept = [
        tmp_path / ".pk2.a1b2c3d4.partial",  # another output's build
        tmp_path / ".pk.lock",
        tmp_path / ".pk.old",  # atomic.recover's to put back
        out / ".gitignore",
        out / "notes.tmp",
        out / "state" / "step-60",
    ]
    for p in leftovers + kept:
        if p.suffix in (".partial", ".deleting") or p.name.startswith((".pk.cache", "step-")):
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"\0" * 1000)
        else:
            p.write_text("x")
    with caplog.at_level("INFO", logger="vgdistill"), atomic.exclusive(out, subfolders=("state",)):
        pass
    assert [p for p in leftovers if os.path.lexists(p)] == []
    assert all(p.exists() for p in kept)
    assert "removed 6 leftover(s)" in caplog.text


# ------------------------------------------------------------------------------ checksums


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the tensor data (past safetensors' JSON header)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoint_weights_are_checked_against_their_sha256(tmp_path):
    """config.json records the weights' SHA-256; a flipped byte in the tensor data (which
    safetensors itself accepts) is refused on load with a one-line reason."""
    from safetensors.torch import load_file

    from vgdistill.models.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from vgdistill.models.files import sha256_file

    model, recipe = _tiny_model()
    folder = tmp_path / "best"
    save_checkpoint(model, recipe, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["sha256"] == {"model.safetensors": sha256_file(folder / "model.safetensors")}
    load_checkpoint(folder)
    _flip_tensor_byte(folder / "model.safetensors")
    load_file(str(folder / "model.safetensors"))  # still a well-formed file
    for load in (lambda: load_checkpoint(folder), lambda: load_model_weights(model, folder)):
        with pytest.raises(VGError, match=r"model\.safetensors is damaged: its SHA-256"):
            load()
    # A checkpoint written before checksums were recorded still loads (nothing to check).
    del config["sha256"]
    (folder / "config.json").write_text(json.dumps(config))
    load_checkpoint(folder)


@pytest.fixture
def saved_state(tmp_path):
    """A run folder with one resumable state saved by Checkpoints.save_state."""
    from accelerate import Accelerator

    from vgdistill.recipe import load_recipe
    from vgdistill.training.checkpoints import Checkpoints, RunState
    from vgdistill.training.rundir import RunDir

    recipe = load_recipe(RECIPE, ['distill.modality="none"', "train.lr=1e-3"])
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    state = RunState()
    acc.register_for_checkpointing(state)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    atomic.write_text(run.recipe, "placeholder")
    state.step = 7
    checkpoints = Checkpoints(acc, run, recipe, state)
    checkpoints.save_state()
    return checkpoints, run, recipe


def test_resumable_state_records_its_recipe_and_checksums(saved_state):
    """state/step-N holds the recipe and a SHA-256 per file; a flipped byte is refused."""
    from vgdistill.recipe import load_recipe, to_toml

    checkpoints, run, recipe = saved_state
    (state,) = run.states()
    assert to_toml(load_recipe(run.state_recipe(state))) == to_toml(recipe)
    sums = json.loads(run.state_checksums(state).read_text())
    assert {"model.safetensors", "optimizer.bin", "recipe.toml"} <= set(sums)
    assert checkpoints.load_latest()
    _flip_tensor_byte(state / "model.safetensors")
    with pytest.raises(VGError, match=r"model\.safetensors is damaged.*delete that folder"):
        checkpoints.load_latest()


def test_resume_check_does_not_depend_on_recipe_toml(saved_state):
    """recipe.toml deleted: a resume with another lr is still refused (the state's recipe);
    the same recipe still resumes."""
    from vgdistill.recipe import load_recipe
    from vgdistill.training.checkpoints import RecipeMismatch, check_folder

    _, run, recipe = saved_state
    run.recipe.unlink()
    other = load_recipe(RECIPE, ['distill.modality="none"', "train.lr=5e-4"])
    with pytest.raises(RecipeMismatch, match=r"state/step-7/recipe\.toml in train\.lr"):
        check_folder(run, other, resume=True)
    check_folder(run, recipe, resume=True)


def test_full_disk_while_saving_a_state(saved_state, monkeypatch):
    """Accelerate's state write stopped by a full disk: DiskFullError with the size of the
    previous state, no `.step-N.partial` left, the previous state intact."""
    from vgdistill import errors

    checkpoints, run, _ = saved_state
    (previous,) = run.states()
    real_save = checkpoints.acc.save_state

    def torn(output_dir):
        real_save(output_dir)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 4")

    monkeypatch.setattr(checkpoints.acc, "save_state", torn)
    monkeypatch.setattr(errors, "free_bytes", lambda folder: 0)
    checkpoints.state.step = 8
    with pytest.raises(DiskFullError, match=r"holding .*state \(this write needs about"):
        checkpoints.save_state()
    assert [p.name for p in run.state_root.iterdir()] == ["step-7"]
    assert run.states() == [previous]
    monkeypatch.undo()
    assert checkpoints.load_latest()


# ------------------------------------------------------------------------------ stdout


def test_closed_stdout_keeps_the_exit_status(tmp_path):
    """`vgdistill ... | head` where head has already gone: exit 0, no error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vgdistill", "recipe", "show", str(RECIPE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "error" not in err.lower(), err
