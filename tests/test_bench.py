"""`vgdistill bench`: figures present and positive on the tiny preset, teacher cache hits,
paired ratios, and one-line errors for bad input. Random weights only, no downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgdistill.cli.app import app  # noqa: E402
from vgdistill.tools.bench.fastpath import FastPath  # noqa: E402
from vgdistill.tools.bench.timing import Config, paired_ratio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.toml")
runner = CliRunner()


@pytest.fixture(autouse=True)
def restore_threads():
    """bench --threads changes torch's global thread count: put it back for other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def positive_numbers(d, path=""):
    """Every number in a nested dict/list, with its dotted path."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from positive_numbers(v, f"{path}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from positive_numbers(v, f"{path}[{i}]")
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield path, d


def test_bench_json_on_tiny_preset(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "bench", TINY,
        "--set", "distill.teacher_arch=vgd-tiny-clip",
        "--set", "data.num_workers=1",  # the worker path of the data figure
        "--set", "data.augment=true",
        "--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--repeats", "2", "--each", "--threads", "1", "--json", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train step img/s" in result.output and "fast / plain" in result.output
    r = json.loads(out.read_text())
    fast, plain = r["train"]["fast"], r["train"]["plain"]
    for d in (fast, plain):
        for key in (
            "images_per_s",
            "images_per_s_with_teacher",
            "peak_memory_mb",
            "tflops",
            "tflops_with_teacher",
        ):
            assert d[key] > 0, key
        assert len(d["repeats"]) == 2 and "teacher_overhead_pct" in d
    for path in ("fast", "plain"):
        assert r["eval"][path]["images_per_s"] > 0 and r["eval"][path]["tflops"] > 0
    assert set(r["speedup"]) == {"train", "train+teacher", "eval"}
    assert all(v > 0 for v in r["speedup"].values())
    flops = r["flops"]
    # Counted: training (fwd+bwd) costs about 3x a forward pass; the teacher adds its image.
    assert 2.0 < flops["train_per_image"] / flops["eval_per_image"] < 4.0
    assert flops["teacher_image_per_image"] > 0 and flops["teacher_text_per_phrase"] > 0
    data = r["data"]
    assert data["workers"] == 1 and data["images_per_s"] > 0
    assert data["images_per_s_one_process"] > 0 and data["workers_to_keep_up"] >= 1
    # --each: every feature that is on for this recipe on a CPU, switched off alone.
    names = {o["name"] for o in r["optimisations"]}
    assert names == {"sdpa", "channels_last", "teacher_cache", "fused_adamw"}
    assert all(o["on_images_per_s"] > 0 and o["off_images_per_s"] > 0 for o in r["optimisations"])
    assert r["fast_path"]["sdpa"] and not r["fast_path"]["tf32"]  # TF32 is CUDA-only
    # Every step of the fast path found its phrases in the prewarmed cache.
    cache = r["teacher_cache"]
    assert cache["hits"] > 0 and cache["misses"] <= cache["distinct_phrases"] * 4
    assert "targets" not in r  # GPU targets are not judged on a CPU
    numbers = dict(positive_numbers(r))
    negative = {k: v for k, v in numbers.items() if v < 0 and "teacher_overhead" not in k}
    assert not negative


def test_bench_times_the_cached_step_of_a_frozen_visual_branch(tmp_path):
    """A recipe that trains on cached visual tokens (the demo's) gets that step timed too."""
    out = tmp_path / "bench.json"
    frozen = [
        "train.lr_backbone=0.0",
        "train.lr_encoder=0.0",
        "data.augment=true",
        'data.augment_ops=["flip"]',
        "distill.teacher_arch=vgd-tiny-clip",
    ]
    args = ["bench", TINY, *sum((["--set", f] for f in frozen), []), "--no-data",
            "--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1",
            "--repeats", "2", "--threads", "1", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "cached" in result.output
    r = json.loads(out.read_text())
    for path in ("fast", "plain"):
        d = r["train"][path]
        assert d["images_per_s_cached"] > 0 and len(d["repeats_cached"]) == 2
        assert d["cached_speedup"] > 0
    assert set(r["speedup"]) == {"train", "train+teacher", "train cached", "eval"}


def test_paired_ratio_cancels_load_shared_by_a_window():
    # The machine slowed down 2x in the second repeat: both configurations felt it.
    fast = Config("a", FastPath(), "train", rates=[10.0, 5.0, 10.0])
    plain = Config("b", FastPath(), "train", rates=[5.0, 2.5, 5.0])
    assert paired_ratio(fast, plain) == pytest.approx(2.0)
    assert FastPath().without("autocast").autocast == "no"
    assert not FastPath().without("teacher_cache").teacher_cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_bench_cuda_without_gpu_is_one_line_error():
    result = runner.invoke(app, ["bench", TINY, "--device", "cuda", "--no-data"])
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.output and "Traceback" not in result.output


def test_bench_missing_teacher_folder_says_what_to_set(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'extends = "{TINY}"\n[distill]\nteacher = "{tmp_path / "no-such-teacher"}"\n'
        'teacher_arch = ""\n'
    )
    result = runner.invoke(app, ["bench", str(recipe), "--no-data", "--steps", "1"])
    assert result.exit_code == 2
    assert "distill.teacher_arch" in result.output


def test_bench_rejects_zero_steps():
    result = runner.invoke(app, ["bench", TINY, "--steps", "0", "--no-data"])
    assert result.exit_code == 2 and "--steps must be >= 1" in result.output


def test_bench_without_teacher_and_without_plain_path(tmp_path):
    out = tmp_path / "b.json"
    args = [
        "bench", TINY, "--set", "distill.modality=none", "--no-data", "--no-compare-plain",
        "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1",
        "--json", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert set(r["train"]) == {"fast"} and "images_per_s_with_teacher" not in r["train"]["fast"]
    assert r["train"]["fast"]["images_per_s"] > 0 and r["eval"]["fast"]["images_per_s"] > 0
    assert "speedup" not in r and "teacher_cache" not in r and "data" not in r
    assert r["flops"]["teacher_image_per_image"] == 0


def test_bench_json_dash_prints_the_figures_to_stdout(tmp_path, monkeypatch):
    """--json - prints the JSON (and nothing else) to stdout, like eval and predict."""
    monkeypatch.chdir(tmp_path)
    args = [
        "bench", TINY, "--set", "distill.modality=none", "--no-data", "--no-compare-plain",
        "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1",
        "--json", "-",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)  # no table, no "wrote" line
    assert r["train"]["fast"]["images_per_s"] > 0 and r["eval"]["fast"]["images_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_bench_data_measures_a_prepared_datasets_loader_and_eval(tmp_path, tiny_data):
    """--data PATH: loader per core uint8 vs float-in-the-loader on the same draws, and eval
    with the shared visual pass vs per row on the same rows (same Acc@0.5)."""
    out = tmp_path / "bench.json"
    args = [
        "bench", TINY, "--data", str(tiny_data), "--set", "distill.modality=none",
        "--set", "data.augment=true", "--set", "data.val_split=train",  # ~2 rows per image
        "--device", "cpu", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--repeats", "2", "--eval-rows", "12",
        "--json", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "loader per core" in result.output and "shared visual pass" in result.output
    d = json.loads(out.read_text())["dataset"]
    lo = d["loader"]
    for path in ("uint8", "float_in_worker"):
        assert lo[path]["images_per_s"] > 0 and len(lo[path]["repeats"]) == 2
        assert lo[path]["augmentation"]["samples"] == 2 * 2 * 4
    assert lo["speedup"] > 0 and lo["same_augmentation"] and lo["same_pixels"]
    assert lo["augment_ops"] and lo["workers"] == 1
    ev = d["eval"]
    assert ev["rows"] >= 12
    for path in ("shared", "per_row"):
        assert ev[path]["expressions_per_s"] > 0 and ev[path]["images_per_s"] > 0
        assert ev[path]["images"] < ev["rows"]  # shapes images hold several expressions
    assert ev["same_acc50"] and ev["miou_difference"] < 1e-4 and ev["speedup"] > 0
    assert "train" not in json.loads(out.read_text())  # the dataset mode times no steps


def test_bench_data_refuses_no_data_and_a_missing_split(tmp_path, tiny_data):
    both = runner.invoke(app, ["bench", TINY, "--data", str(tiny_data), "--no-data"])
    assert both.exit_code == 2 and "--no-data" in both.output
    args = ["bench", TINY, "--data", str(tiny_data), "--set", "data.val_split=nope"]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 2 and "no split 'nope'" in missing.output
    assert "Traceback" not in missing.output
