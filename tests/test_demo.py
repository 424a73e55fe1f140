"""`vgdistill demo` runs the whole chain end to end (on a few rows) and reuses finished stages;
`--stop-after` ends it after a stage; `--recipe` takes shipped names."""

import json

import pytest
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.training.rundir import RunDir

runner = CliRunner()


@pytest.mark.slow  # the whole chain: prepare, detector, teacher, train, eval
def test_demo_chain_end_to_end_then_reuses(tmp_path):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--rows",
        "80",
        "--no-progress",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.epochs=1",
    ]
    first = runner.invoke(app, argv)
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"val", "testA", "testB"}
    for res in summary["results"].values():
        assert 0.0 <= res["acc50"] <= 1.0 and "shuffle" in res
    assert summary["teacher_val_retrieval"]["i2t_r1"] >= 0.0
    assert 0.0 <= summary["detector_val"]["found50"] <= 1.0
    assert (out / "detector" / "detr.safetensors").is_file()
    assert len(summary["pictures"]) == 4
    assert all((out / "predict" / p.split("/")[-1]).is_file() for p in summary["pictures"])
    assert (out / "student" / "best" / "model.safetensors").is_file()
    # eval.json has the one shape `vgdistill eval` writes: {"results": {split: metrics}, ...}.
    record = json.loads((out / "student" / "eval.json").read_text())
    assert record["control"] == "shuffle"
    assert RunDir(out / "student").read_eval() == summary["results"]

    again = runner.invoke(app, argv)
    assert again.exit_code == 0, again.output
    reused = json.loads((out / "summary.json").read_text())["reused"]
    assert reused == {
        "prepare shapes": True,
        "pretrain detector": True,
        "fit teacher": True,
        "train student": True,
    }

    # Other student settings (as after an upgrade) are refused with the fix, nothing lost.
    # (More steps alone would continue the finished run.)
    changed = runner.invoke(app, [*argv, "--set", "train.lr=0.002"])
    assert changed.exit_code == 2
    assert "trained with other settings (train.lr); pass --force" in changed.output
    assert (out / "student" / "best" / "model.safetensors").is_file()


def test_stop_after_prepare_runs_only_the_first_stage(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--rows", "40", "--no-progress", "--stop-after", "prepare"]
    result = runner.invoke(app, [*argv, "--recipe", "demo_full"])
    assert result.exit_code == 0, result.output
    assert "stopped after prepare" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stopped_after"], list(summary["stages_s"])) == ("prepare", ["prepare shapes"])
    assert (out / "data" / "prepare.json").is_file()
    assert not (out / "detector").exists() and not (out / "student").exists()

    bad = runner.invoke(app, [*argv[:-1], "teach"])
    assert bad.exit_code == 2 and "choose one of prepare, detector, teacher" in bad.output
