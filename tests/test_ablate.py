"""`vgdistill ablate`: planning, bad factor values, summaries, failures, and kill + resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.recipe import load_recipe
from vgdistill.tools.ablate.plan import FACTORS, idle_changes, plan, toml_value
from vgdistill.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.toml"
runner = CliRunner()


def _sets(data: Path | str) -> list[str]:
    """The tiny recipe cut down to seconds of work: no teacher, 2 steps, two eval splits."""
    items = [
        f"data.path={json.dumps(str(data))}",
        "distill.modality=none",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.warmup_steps=0",
        "eval.batch_size=16",
        'eval.splits=["val","testA"]',
    ]
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def data(tiny_data):
    """The session's tiny prepared shapes dataset (51 train rows, 3 per eval split)."""
    return tiny_data


def _fake_eval(run_dir: Path, **acc50: float) -> None:
    """A finished run as `vgdistill eval` leaves it (only eval.json matters to ablate)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {s: {"acc50": v, "acc75": 0.0, "miou": 0.0, "count": 3} for s, v in acc50.items()}
    RunDir(run_dir).write_eval({"results": results})


@pytest.mark.parametrize(
    "option, value, valid",
    [
        ("--loss", "cosine,huber", "cosine, l1, mse"),
        ("--distill-pos", "fusion,head", "fusion, linear, backbone, cnn"),
        ("--teacher-view", "padded,crop", "padded, image"),
        ("--modality", "all", "both, image, text, none"),
        ("--teacher", "frozen,unfrozen", "frozen, trainable"),
        ("--alpha", "0.5,abc", "not a number"),
        ("--beta", "-1", ">= 0"),
        ("--loss", "cosine,,l1", "without empty items"),
    ],
)
def test_unknown_factor_value_is_one_line_naming_valid_ones(tmp_path, option, value, valid):
    out = tmp_path / "abl"
    result = runner.invoke(app, ["ablate", str(RECIPE), option, value, "--out", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and option in lines[0] and valid in lines[0]
    assert not out.exists()


def test_plan_one_at_a_time_grid_and_seeds(tmp_path):
    base = load_recipe(RECIPE, ["distill.loss=cosine", "distill.alpha=1.5", "train.seed=7"])
    factors = {"loss": FACTORS["loss"].parse("cosine,l1,mse"), "alpha": [0.5, 1.5]}
    one = plan(base, factors, grid=False, seeds=1, out=tmp_path)
    assert [v.name for v in one] == ["baseline", "loss-l1", "loss-mse", "alpha-0.5"]
    assert one[0].changes == {} and one[3].changes == {"distill.alpha": 0.5}
    assert [r.dir for r in one[1].runs] == [tmp_path / "loss-l1"]
    assert one[1].overrides() == ['distill.loss="l1"']

    grid = plan(base, factors, grid=True, seeds=3, out=tmp_path)
    names = [v.name for v in grid]
    assert names[0] == "baseline" and len(names) == 6 and "loss-mse_alpha-0.5" in names
    assert [r.seed for r in grid[0].runs] == [7, 8, 9]
    # The recipe's own seed keeps the plain folder (shared with a one-seed ablation).
    assert [r.dir.name for r in grid[0].runs] == ["baseline", "baseline_seed-8", "baseline_seed-9"]
    assert grid[0].overrides(grid[0].runs[0]) == []
    assert grid[0].overrides(grid[0].runs[1]) == ["train.seed=8"]

    none = load_recipe(RECIPE, ["distill.modality=none"])
    idle = plan(
        none, {"alpha": [1.5, 0.5], "modality": ["none", "text"]}, grid=True, seeds=1, out=tmp_path
    )
    assert {v.name: idle_changes(v, none) for v in idle} == {
        "baseline": [],
        "alpha-0.5": ["distill.alpha"],  # no distillation at all: alpha cannot matter
        "modality-text": [],
        "alpha-0.5_modality-text": ["distill.alpha"],  # alpha weighs the image loss only
    }

    teacher = plan(
        base, {"teacher": FACTORS["teacher"].parse("frozen,trainable")}, False, 1, tmp_path
    )
    assert teacher[1].name == "teacher-trainable"
    assert teacher[1].changes == {"distill.teacher_trainable": True}
    assert [toml_value(v) for v in (True, 0.5, "l1")] == ["true", "0.5", '"l1"']


def test_dry_run_lists_variants_and_runs_nothing(tmp_path, data):
    out = tmp_path / "abl"
    _fake_eval(out / "baseline", val=0.5, testA=0.5)
    args = ["ablate", str(RECIPE), "--loss", "l1", "--modality", "none,text", "--dry-run"]
    result = runner.invoke(app, [*args, *_sets(data), "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("baseline", "loss-l1", "modality-text"):
        assert name in result.stdout
    assert "done (skipped)" in result.stdout and 'distill.loss="l1"' in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["baseline"]


def test_seeds_summary_mean_std_delta_and_best(tmp_path, data):
    out = tmp_path / "abl"
    _fake_eval(out / "baseline", val=0.50, testA=0.60)
    _fake_eval(out / "baseline_seed-14", val=0.60, testA=0.60)
    _fake_eval(out / "alpha-0.5", val=0.70, testA=0.40)
    _fake_eval(out / "alpha-0.5_seed-14", val=0.80, testA=0.50)
    args = ["ablate", str(RECIPE), "--alpha", "0.5", "--seeds", "2", *_sets(data)]
    result = runner.invoke(app, [*args, "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.stdout.count("finished earlier, skipped") == 4

    summary = json.loads((out / "summary.json").read_text())
    base, alpha = summary["variants"]
    assert (base["name"], alpha["name"]) == ("baseline", "alpha-0.5")
    assert base["acc50_pct"]["val"]["mean"] == pytest.approx(55.0)
    assert base["acc50_pct"]["val"]["std"] == pytest.approx(7.0711, abs=1e-3)  # sample std
    assert alpha["delta_pct"] == {"val": pytest.approx(20.0), "testA": pytest.approx(-15.0)}
    assert base["best"] == ["testA"] and alpha["best"] == ["val"]
    assert "75.00 ± 7.07 *" in result.stdout and "+20.00" in result.stdout

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["variant"] for r in rows] == ["baseline", "alpha-0.5"]
    assert float(rows[1]["testA_delta_pct"]) == pytest.approx(-15.0) and rows[1]["val_best"] == "1"
    md = (out / "summary.md").read_text()
    assert "| alpha-0.5 | **0.5** | **75.00 ± 7.07** (+20.00) | 45.00 ± 7.07 (-15.00) |" in md


def test_failed_variant_is_shown_with_its_log_and_the_rest_summarised(tmp_path):
    out = tmp_path / "abl"
    _fake_eval(out / "baseline", val=0.5, testA=0.25)  # finished earlier: skipped
    missing = tmp_path / "no-such-data"  # the l1 variant's training fails on it
    args = ["ablate", str(RECIPE), "--loss", "l1", *_sets(missing), "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    log = out / "loss-l1" / "ablate.log"
    assert "FAILED" in result.stderr and str(log) in result.stderr
    assert str(missing) in log.read_text()  # the child's one-line error is in its log
    summary = json.loads((out / "summary.json").read_text())
    ok, failed = summary["variants"]
    assert ok["status"] == "ok" and ok["acc50_pct"]["val"]["mean"] == pytest.approx(50.0)
    assert failed["status"] == "failed" and failed["runs"][0]["log"] == str(log)
    assert "train exited 2" in failed["runs"][0]["error"]
    assert "failed" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_ablate_killed_after_first_variant_resumes_without_retraining(tmp_path, data):
    """Kill the whole ablation (parent and child) once the baseline is scored; re-run."""
    out = tmp_path / "abl"
    args = ["ablate", str(RECIPE), "--loss", "cosine,l1", *_sets(data), "--out", str(out)]
    first_eval = out / "baseline" / "eval.json"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vgdistill", *args],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes its children too
        )
        deadline = time.monotonic() + 900
        while not first_eval.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first_eval.exists(), (tmp_path / "first.log").read_text()
    assert not (out / "loss-l1" / "eval.json").exists()
    assert not (out / "summary.json").exists()  # it never got that far

    watched = [
        out / "baseline" / p
        for p in (
            "best/model.safetensors",
            "last/model.safetensors",
            "eval.json",
            "metrics.jsonl",
            "recipe.toml",
        )
    ]
    before = {p: p.stat().st_mtime_ns for p in watched}
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[1/2] baseline: finished earlier, skipped" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # not retrained or re-scored

    summary = json.loads((out / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["baseline", "loss-l1"]
    assert all(v["status"] == "ok" for v in summary["variants"])
    assert summary["splits"] == ["val", "testA"]
    second = out / "loss-l1"
    assert 'loss = "l1"' in (second / "recipe.toml").read_text()  # a normal run folder
    assert (second / "best" / "model.safetensors").exists()
    headers = [
        x for x in (out / "baseline" / "ablate.log").read_text().splitlines() if x[:4] == "=== "
    ]
    assert len(headers) == 2 and " train " in headers[0] and " eval " in headers[1]  # ran once
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["variant"] for r in rows] == ["baseline", "loss-l1"]


def _distill_sets(data: Path, teacher: Path) -> list[str]:
    """A 2-step distilling run of the tiny recipe whose images get padding (random resize)."""
    items = [
        f"data.path={json.dumps(str(data))}",
        f"distill.teacher={json.dumps(str(teacher))}",
        "data.augment=true",
        'data.augment_ops=["resize"]',
        "train.max_steps=2",
        "train.batch_size=8",
        "train.warmup_steps=0",
        "train.log_every=1",
        "eval.batch_size=16",
        'eval.splits=["val","testA"]',
    ]
    return [arg for item in items for arg in ("--set", item)]


def test_dry_run_lists_distill_positions_and_teacher_views(tmp_path, data, tiny_teacher):
    out = tmp_path / "abl"
    args = [
        "ablate",
        str(RECIPE),
        "--distill-pos",
        "fusion,linear,backbone,cnn",
        "--teacher-view",
        "padded,image",
        "--dry-run",
        *_distill_sets(data, tiny_teacher),
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    names = ["baseline", "position-linear", "position-backbone", "position-cnn", "view-image"]
    for name in names:
        assert name in result.stdout
    assert 'distill.position="cnn"' in result.stdout
    assert 'distill.teacher_view="image"' in result.stdout
    assert "position-fusion" not in result.stdout and "view-padded" not in result.stdout
    assert "warning" not in result.stderr and not out.exists()
    # The grid crosses them: 4 positions x 2 views.
    base = load_recipe(RECIPE, ["distill.modality=both"])
    factors = {
        "position": FACTORS["position"].parse("fusion,linear,backbone,cnn"),
        "view": FACTORS["view"].parse("padded,image"),
    }
    grid = plan(base, factors, grid=True, seeds=1, out=tmp_path)
    assert len(grid) == 8 and "position-cnn_view-image" in [v.name for v in grid]
    # The teacher's view is idle when no image embedding is distilled.
    text = load_recipe(RECIPE, ["distill.modality=text"])
    (_, image_view) = plan(text, {"view": ["image"]}, grid=False, seeds=1, out=tmp_path)
    assert idle_changes(image_view, text) == ["distill.teacher_view"]


@pytest.mark.slow
def test_cnn_position_and_image_view_variants_train(tmp_path, data, tiny_teacher):
    """One short run of each new variant: trained (image distillation on) and scored."""
    out = tmp_path / "abl"
    _fake_eval(out / "baseline", val=0.5, testA=0.5)
    args = ["ablate", str(RECIPE), "--distill-pos", "cnn", "--teacher-view", "image"]
    result = runner.invoke(
        app, [*args, *_distill_sets(data, tiny_teacher), "--out", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["baseline", "position-cnn", "view-image"]
    assert all(v["status"] == "ok" for v in summary["variants"])
    for name, line in (("position-cnn", 'position = "cnn"'), ("view-image", 'view = "image"')):
        run = RunDir(out / name)
        assert line in run.recipe.read_text()
        steps = [json.loads(x) for x in run.metrics.read_text().splitlines()]
        losses = [s["loss_distill_img"] for s in steps if "loss_distill_img" in s]
        assert losses and all(0 < v < 2 for v in losses), (name, steps)


def _recording_launcher(tmp_path: Path) -> tuple[Path, Path]:
    """A launcher that records its arguments (one JSON line per start), then runs what follows
    its own options (`-m vgdistill ...`) with this Python, as a one-process launcher would."""
    record = tmp_path / "launches.jsonl"
    script = tmp_path / "record-launch"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, subprocess, sys\n"
        f"with open({str(record)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "args = sys.argv[sys.argv.index('-m'):]\n"
        "sys.exit(subprocess.call([sys.executable, *args]))\n"
    )
    script.chmod(0o755)
    return script, record


@pytest.mark.slow
def test_launch_runs_each_child_under_the_launcher_and_shard_takes_its_share(tmp_path, data):
    out = tmp_path / "abl"
    _fake_eval(out / "baseline", val=0.5, testA=0.25)  # shard 1/2's run, finished elsewhere
    script, record = _recording_launcher(tmp_path)
    args = ["ablate", str(RECIPE), "--loss", "cosine,l1", *_sets(data), "--out", str(out)]
    launch = f"{script} --num_processes 1"
    result = runner.invoke(app, [*args, "--launch", launch, "--shard", "2/2"])
    assert result.exit_code == 0, result.output
    assert "[1/1] loss-l1: training" in result.stdout and "baseline:" not in result.stdout

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c[:5] for c in calls] == [
        ["--num_processes", "1", "-m", "vgdistill", "train"],
        ["--num_processes", "1", "-m", "vgdistill", "eval"],
    ]
    assert calls[0][5:8] == [str(RECIPE), "--out", str(out / "loss-l1")]
    assert "distill.loss=\"l1\"" in calls[0] and calls[1][5] == str(out / "loss-l1")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["launch"], summary["shard"]) == ([str(script), "--num_processes", "1"], "2/2")
    assert [v["status"] for v in summary["variants"]] == ["ok", "ok"]  # both shards' runs


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--launch", "no-such-launcher-h1 --num_processes 2"], "no-such-launcher-h1 is not a"),
        (["--launch", "accelerate launch 'unclosed"], "No closing quotation"),
        (["--shard", "3/2"], "I must be between 1 and N"),
        (["--shard", "two"], "--shard takes I/N"),
    ],
)
def test_bad_launch_or_shard_is_one_line_before_any_run(tmp_path, extra, message):
    out = tmp_path / "abl"
    result = runner.invoke(app, ["ablate", str(RECIPE), "--loss", "l1", "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_shards_split_the_runs_in_plan_order(tmp_path):
    from vgdistill.tools.ablate.runner import shard_runs

    base = load_recipe(RECIPE)
    variants = plan(base, {"loss": ["l1", "mse"]}, grid=False, seeds=2, out=tmp_path)
    every = [run.dir.name for _, run in shard_runs(variants, None)]
    assert len(every) == 6
    shares = [[run.dir.name for _, run in shard_runs(variants, (i, 4))] for i in (1, 2, 3, 4)]
    assert shares == [every[0::4], every[1::4], every[2::4], every[3::4]]
    assert sorted(sum(shares, [])) == sorted(every)
