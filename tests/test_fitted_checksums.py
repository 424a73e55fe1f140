"""The teacher and detector folders record their weights' SHA-256; a changed byte is refused.

Checkpoint folders and resumable states are covered in tests/test_faults_fs.py, whose
byte-flipping helper this file shares.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_faults_fs import _flip_tensor_byte
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.errors import VGError
from vgdistill.models.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _refused(command: str, out: Path, sets: list[str], *more: str) -> str:
    """The one line `vgdistill COMMAND tiny.toml --out OUT --set ...` printed, refused (exit 2)."""
    argv = [command, str(ROOT / "recipes" / "tiny.toml"), "--out", str(out), *more]
    result = runner.invoke(app, [*argv, *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _drop_checksum(record: Path) -> None:
    """Make `record` look like one written before checksums were recorded."""
    raw = json.loads(record.read_text())
    del raw["sha256"]
    record.write_text(json.dumps(raw))


def test_teacher_weights_are_checked_against_their_sha256(
    tiny_teacher, tiny_data, tiny_sets, tmp_path
):
    """open_clip_config.json records the teacher's SHA-256; a flipped byte in the tensor data
    stops distillation (and `teacher --init`) with one line naming the file."""
    from vgdistill.models.teacher import Teacher
    from vgdistill.recipe import DistillConfig

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, folder)
    weights, config = folder / "open_clip_model.safetensors", folder / "open_clip_config.json"
    assert json.loads(config.read_text())["sha256"] == {weights.name: sha256_file(weights)}
    cfg = DistillConfig(teacher=str(folder), teacher_pretrained="")
    Teacher.from_config(cfg)
    _flip_tensor_byte(weights)
    with pytest.raises(VGError, match=r"open_clip_model\.safetensors is damaged: its SHA-256"):
        Teacher.from_config(cfg)
    named = DistillConfig(teacher="vgd-tiny-clip", teacher_pretrained=str(weights))
    with pytest.raises(VGError, match=r"open_clip_model\.safetensors is damaged"):
        Teacher.from_config(named)  # the weights file named directly is checked too
    Teacher.from_config(cfg, load_weights=False)  # the architecture alone reads no weights
    teacher = f"distill.teacher={json.dumps(str(folder))}"
    sets = tiny_sets(tiny_data, 'distill.modality="both"', teacher)
    line = _refused("train", tmp_path / "run", sets, "--no-progress")
    assert "open_clip_model.safetensors is damaged" in line
    line = _refused("teacher", tmp_path / "refit", sets, "--init", str(folder))
    assert "open_clip_model.safetensors is damaged" in line
    _drop_checksum(config)  # a folder written before checksums loads unchecked
    Teacher.from_config(cfg)


def test_detector_weights_are_checked_against_their_sha256(tiny_data, tiny_sets, tmp_path):
    """detector.json records detr.safetensors' SHA-256; a flipped byte stops the training that
    starts from it (model.detr_checkpoint) with one line naming the file."""
    from vgdistill.models.factory import build_model
    from vgdistill.recipe import load_recipe
    from vgdistill.training.detector import fit_detector

    out = tmp_path / "detector"
    fit = tiny_sets(tiny_data, "detector.steps=2", "detector.batch_size=4")
    report = fit_detector(load_recipe(ROOT / "recipes" / "tiny.toml", fit), out, progress=False)
    weights = out / "detr.safetensors"
    assert report["sha256"] == {weights.name: sha256_file(weights)}
    sets = tiny_sets(tiny_data, f"model.detr_checkpoint={json.dumps(str(weights))}")
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml", sets)
    build_model(recipe)
    _flip_tensor_byte(weights)
    with pytest.raises(VGError, match=r"detr\.safetensors is damaged: its SHA-256"):
        build_model(recipe)
    line = _refused("train", tmp_path / "run", sets, "--no-progress")
    assert "detr.safetensors is damaged" in line and "vgdistill detector --force" in line
    _drop_checksum(out / "detector.json")  # written before checksums: loads unchecked
    build_model(recipe)
