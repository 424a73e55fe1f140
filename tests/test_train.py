"""Training end to end on the tiny preset: loss falls, checkpoints reload, resume is exact,
two processes agree with one, and bad runs stop with clear errors.

Everything runs on the CPU on a few dozen synthetic `shapes` rows with a tiny random CLIP
teacher saved in open_clip's local-dir layout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.toml"
TRAIN_ROWS, VAL_ROWS = 24, 11  # 11: uneven over 2 processes x batch 4
runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_teacher):
    """A tiny prepared shapes dataset (uneven val) beside the session's tiny teacher folder."""
    from vgdistill.data.prepare import prepare
    from vgdistill.data.sources.base import SourceArgs

    root = tmp_path_factory.mktemp("assets")
    counts = {"train": TRAIN_ROWS, "val": VAL_ROWS}
    prepare("shapes", SourceArgs(seed=0, split_rows=counts), root / "data", progress=False)
    (root / "teacher").symlink_to(tiny_teacher, target_is_directory=True)
    return root


def overrides(assets: Path, *extra: str) -> list[str]:
    """--set options for a short tiny run on the test assets."""
    return [
        f'data.path="{assets / "data"}"',
        f'distill.teacher="{assets / "teacher"}"',
        "train.epochs=3",  # 3 steps per epoch at batch 8
        "train.batch_size=8",
        "train.warmup_steps=2",
        "train.log_every=1",
        "eval.batch_size=4",
        'eval.splits=["val"]',
        *extra,
    ]


def recipe(assets: Path, *extra: str):
    from vgdistill.recipe import load_recipe

    return load_recipe(RECIPE, overrides(assets, *extra))


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    """An uninterrupted 9-step run (distillation on both modalities)."""
    from vgdistill.training.student import train

    out = tmp_path_factory.mktemp("runs") / "baseline"
    summary = train(recipe(assets), out, show_progress=False)
    return out, summary


def test_train_loss_falls_and_last_reloads(assets, baseline):
    from vgdistill.evaluation.evaluate import evaluate
    from vgdistill.models.checkpoint import load_checkpoint

    out, summary = baseline
    assert summary["finished"] and summary["step"] == 9
    for name in ("recipe.toml", "metrics.jsonl", "curves.png", "train_summary.json"):
        assert (out / name).is_file(), name
    assert (out / "best" / "model.safetensors").is_file()
    # At most train.keep (2) resumable states, the newest at the last step.
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step-6", "step-9"]

    records = read_metrics(out / "metrics.jsonl")
    train_lines = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_lines] == list(range(1, 10))
    assert {
        "loss",
        "loss_l1",
        "loss_giou",
        "loss_distill_img",
        "loss_distill_txt",
        "lr",
        "images_per_s",
        "epoch",
    } <= set(train_lines[0])
    losses = [r["loss"] for r in train_lines]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert [e["step"] for e in evals] == [3, 6, 9]
    assert all(e["count"] == VAL_ROWS and e["split"] == "val" for e in evals)

    # last/ holds exactly the weights of the final resumable state ...
    model, loaded = load_checkpoint(out / "last")
    state = load_file(out / "state" / "step-9" / "model.safetensors")
    own = model.state_dict()
    assert all(torch.equal(own[k], state[f"student.{k}"]) for k in own)
    # ... and reproduces the final validation of the run exactly.
    res = evaluate(model, loaded, ["val"], batch_size=4)["val"]
    assert res["count"] == VAL_ROWS
    assert (res["acc50"], res["miou"]) == (evals[-1]["acc50"], evals[-1]["miou"])


def test_resume_mid_epoch_is_bit_identical(assets, baseline, tmp_path):
    from vgdistill.training.student import TrainInterrupted, train

    out = tmp_path / "resumed"
    r = recipe(assets)
    # Step 4 is the first step of the second epoch: an interruption mid-epoch.
    with pytest.raises(TrainInterrupted) as info:
        train(r, out, stop_at_step=4, show_progress=False)
    assert info.value.exit_code == 130 and "--resume" in str(info.value)
    assert (out / "state" / "step-4").is_dir()
    # A plain re-run refuses to overwrite the run.
    result = runner.invoke(
        app,
        [
            "train",
            str(RECIPE),
            "--out",
            str(out),
            "--no-progress",
            *sum((["--set", s] for s in overrides(assets)), []),
        ],
    )
    assert result.exit_code == 2 and "--resume" in result.output

    summary = train(r, out, resume=True, show_progress=False)
    assert summary["step"] == 9
    base = load_file(baseline[0] / "last" / "model.safetensors")
    mine = load_file(out / "last" / "model.safetensors")
    assert base.keys() == mine.keys()
    different = [k for k in base if not torch.equal(base[k], mine[k])]
    assert not different, different[:5]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert steps == sorted(set(steps))  # no step logged twice
    # Resuming a finished run is a no-op that returns its summary.
    assert train(r, out, resume=True, show_progress=False)["step"] == 9


def test_resume_with_a_different_recipe_is_refused(assets, baseline):
    result = runner.invoke(
        app,
        [
            "train",
            str(RECIPE),
            "--out",
            str(baseline[0]),
            "--resume",
            "--no-progress",
            *sum((["--set", s] for s in overrides(assets, "train.lr=0.5")), []),
        ],
    )
    assert result.exit_code == 2
    assert "train.lr" in result.output


def test_nan_loss_stops_with_clear_error_and_keeps_last_good(assets, tmp_path):
    out = tmp_path / "nan"
    args = overrides(assets, "train.lr=1e30", "train.warmup_steps=0", "train.save_every=1")
    result = runner.invoke(
        app,
        [
            "train",
            str(RECIPE),
            "--out",
            str(out),
            "--no-progress",
            *sum((["--set", s] for s in args), []),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "NaN or infinite" in result.output and "train.lr" in result.output
    # Step 1 was finite and saved; nothing after the non-finite loss was.
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step-1"]
    weights = load_file(out / "last" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_eval_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    (bad / "config.json").write_text("{}")
    result = runner.invoke(app, ["eval", str(bad)])
    assert result.exit_code == 2, result.output
    assert "error" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["eval", str(tmp_path), "--control", "reverse"])
    assert result.exit_code == 2 and "shuffle" in result.output


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    return env


# Runs several CLI commands one after the other in each launched process (one launch, one
# import of torch per process, instead of one per command).
DRIVER = """
import json, sys
from vgdistill.cli.app import app
for argv in json.loads(sys.argv[1]):
    code = app(argv, prog_name="vgdistill", standalone_mode=False)
    if code:
        sys.exit(code)
"""


def _launch(n: int, commands: list, driver: str = DRIVER) -> subprocess.CompletedProcess:
    """`driver` (default: the CLI commands) under `torchrun --nproc_per_node n` on the CPU
    (what `accelerate launch --multi_gpu` runs); Accelerate joins the processes over gloo."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        str(29500 + os.getpid() % 500),
        "--no-python",
        sys.executable,
        "-c",
        driver,
        json.dumps(commands),
    ]
    return subprocess.run(
        launcher, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT
    )


@pytest.mark.slow
def test_two_processes_train_and_eval_match_one(assets, tmp_path):
    from vgdistill.evaluation.evaluate import evaluate
    from vgdistill.models.checkpoint import load_checkpoint

    out = tmp_path / "mp"
    sets = sum(
        (
            ["--set", s]
            for s in overrides(assets, "train.max_steps=3", "train.batch_size=4", "train.epochs=1")
        ),
        [],
    )
    done = _launch(
        2,
        [
            ["train", str(RECIPE), "--out", str(out), "--no-progress", *sets],
            [
                "eval",
                str(out),
                "--split",
                "val",
                "--batch-size",
                "4",
                "--json",
                str(tmp_path / "two.json"),
            ],
        ],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1]["count"] == VAL_ROWS
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2
    model, loaded = load_checkpoint(out)
    one = evaluate(model, loaded, ["val"], batch_size=5)["val"]
    assert two["results"]["val"]["count"] == one["count"] == VAL_ROWS
    assert two["results"]["val"]["acc50"] == one["acc50"]
    assert two["results"]["val"]["acc75"] == one["acc75"]
    assert two["results"]["val"]["miou"] == pytest.approx(one["miou"], abs=1e-6)
    # The run's own last validation (2 processes) agrees with the reloaded checkpoint.
    assert evals[-1]["miou"] == pytest.approx(one["miou"], abs=1e-6)
    assert json.loads((out / "eval.json").read_text())["results"]["val"]["count"] == VAL_ROWS


def _train_until_running(assets, out: Path, epochs: int, *flags: str) -> subprocess.Popen:
    """Start `vgdistill train` in a subprocess and return once it has logged two metrics."""
    sets = sum((["--set", s] for s in overrides(assets, f"train.epochs={epochs}")), [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "vgdistill", "train", str(RECIPE), "--out", str(out), *flags, *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_state(assets, tmp_path):
    out = tmp_path / "sigint"
    proc = _train_until_running(assets, out, 500, "--no-progress")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    step = re.search(r"interrupted at step (\d+)", err)
    assert step, err[-2000:]
    assert (out / "state" / f"step-{step.group(1)}" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sighup_saves_and_the_resumed_run_is_bit_identical(assets, tmp_path):
    """A closed terminal (SIGHUP) stops like SIGTERM; the job's stderr, a pipe, holds plain
    progress lines."""
    from vgdistill.training.student import train

    out = tmp_path / "hup"
    proc = _train_until_running(assets, out, 8)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    step = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert 2 <= step < 24 and (out / "state" / f"step-{step}").is_dir()
    lines = re.findall(r"^step (\d+)/24 epoch \S+ loss .* img/s ETA \S+$", err, re.M)
    assert [int(n) for n in lines] == list(range(1, step + 1)), err[-2000:]

    r = recipe(assets, "train.epochs=8")
    assert train(r, out, resume=True, show_progress=False)["step"] == 24
    train(r, tmp_path / "whole", show_progress=False)
    whole = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    resumed = load_file(out / "last" / "model.safetensors")
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []


FROZEN_FLIP = (
    "train.lr_backbone=0.0",
    "train.lr_encoder=0.0",
    "data.augment=true",
    'data.augment_ops=["flip"]',
)


def _built(r, out: Path):
    from vgdistill.training.student import Trainer

    trainer = Trainer(r, out, show_progress=False)
    trainer.acc = trainer._make_accelerator()
    trainer._build()
    return trainer


def test_frozen_visual_branch_trains_from_cached_tokens(assets, tmp_path):
    from vgdistill.data.image_table import ImageTable
    from vgdistill.data.loader import collate, encode_phrase
    from vgdistill.data.transforms import GroundingTransform
    from vgdistill.training.visual_cache import CachedRows

    trainer = _built(recipe(assets, *FROZEN_FLIP), tmp_path / "probe")
    rows = trainer.seeded
    assert isinstance(rows, CachedRows) and len(rows) == TRAIN_ROWS
    assert rows.cache.tokens.shape[:2] == (TRAIN_ROWS // 2, 2)  # 2 rows per image, 2 flips
    flips = [rows.flipped(i) for i in range(TRAIN_ROWS)]
    assert any(flips) and not all(flips)

    # A cached batch gives the loss that the same rows, flipped the same way, give from pixels.
    idx = list(range(8))
    split = trainer.data["train"]
    images = ImageTable.of(split)
    transform = GroundingTransform(64, augment=False)
    samples = []
    for i in idx:
        row = split[i]
        img = images.load_row(row, f"train row {i}")
        out = transform.fixed(img, row["bbox"], row["expression"], flips[i])
        ids, mask = encode_phrase(trainer.tokenizer, out.phrase, 12)
        samples.append(
            {
                "image": out.image,
                "image_mask": out.mask,
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.tensor(mask),
                "boxes": out.box,
                "phrases": out.phrase,
            }
        )
    module = trainer.module.eval()  # no dropout in BERT, so both forwards are comparable
    with torch.no_grad():
        from_pixels, parts_pixels = module(collate(samples), trainer.frozen_teacher)
        cached, parts_cached = module(rows.__getitems__(idx), trainer.frozen_teacher)
    assert torch.allclose(from_pixels, cached, atol=1e-5), (from_pixels, cached)
    assert parts_cached["loss_distill_img"] > 0
    assert torch.allclose(parts_pixels["loss_distill_img"], parts_cached["loss_distill_img"])


def test_cached_run_resumes_bit_identically(assets, tmp_path):
    from vgdistill.training.student import TrainInterrupted, train

    r = recipe(assets, *FROZEN_FLIP)
    train(r, tmp_path / "whole", show_progress=False)
    with pytest.raises(TrainInterrupted):
        train(r, tmp_path / "resumed", stop_at_step=4, show_progress=False)
    train(r, tmp_path / "resumed", resume=True, show_progress=False)
    whole = load_file(tmp_path / "whole" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "last" / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_cache_too_large_for_its_budget_trains_from_pixels(assets, tmp_path, caplog):
    from vgdistill.data.loader import SeededDataset

    with caplog.at_level("INFO", logger="vgdistill"):
        trainer = _built(recipe(assets, *FROZEN_FLIP, "train.visual_cache_gb=1e-9"), tmp_path)
    assert isinstance(trainer.seeded, SeededDataset)
    assert "train.visual_cache_gb" in caplog.text


# Builds a Trainer (which caches the frozen visual branch) in each launched process and saves
# what that process ended up holding.
CACHE_DRIVER = """
import json, sys, torch
from vgdistill.cli.common import setup_logging
from vgdistill.training.student import Trainer
from vgdistill.recipe import load_recipe
setup_logging(verbose=False)
recipe, out, sets = json.loads(sys.argv[1])
trainer = Trainer(load_recipe(recipe, sets), out, show_progress=False)
trainer.acc = trainer._make_accelerator()
trainer._build()
rows = trainer.seeded
held = {"tokens": rows.cache.tokens, "pad": rows.cache.pad, "teacher": rows.cache.teacher}
torch.save({**held, "boxes": rows.boxes}, f"{out}-{trainer.acc.process_index}.pt")
"""


@pytest.mark.slow
def test_two_processes_each_encode_half_and_all_hold_the_whole_cache(assets, tmp_path):
    sets = overrides(assets, *FROZEN_FLIP)
    done = _launch(2, [str(RECIPE), str(tmp_path / "two"), sets], driver=CACHE_DRIVER)
    assert done.returncode == 0, done.stderr[-3000:]
    # 24 rows = 12 images: 6 encoded by each process
    for rank in (0, 1):
        assert f"6 of the images encoded by process {rank}" in done.stderr, done.stderr[-3000:]
    one = _built(recipe(assets, *FROZEN_FLIP), tmp_path / "one").seeded
    expected = {"tokens": one.cache.tokens, "pad": one.cache.pad, "teacher": one.cache.teacher}
    expected["boxes"] = one.boxes
    for rank in (0, 1):
        held = torch.load(tmp_path / f"two-{rank}.pt")
        for name, want in expected.items():
            assert held[name].shape == want.shape, name
            assert torch.allclose(held[name].float(), want.float(), atol=1e-5), (rank, name)
