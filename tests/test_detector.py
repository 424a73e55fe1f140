"""`vgdistill detector`: a grid detector pretrains the visual branch; DETR-named weights load."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.data.detection import DetectionImages
from vgdistill.data.prepare import load_prepared, prepare
from vgdistill.data.sources import SourceArgs
from vgdistill.errors import VGError
from vgdistill.models.factory import build_model
from vgdistill.models.files import load_state_file
from vgdistill.recipe import load_recipe
from vgdistill.training.detector import REPORT_FILE, WEIGHTS_FILE, fit_detector

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "data"
    counts = {"train": 400, "val": 60, "testA": 2, "testB": 2}
    prepare("shapes", SourceArgs(seed=5, split_rows=counts), out, progress=False)
    return out


# The fitted fixture's [detector] settings (seed: train.seed).
FIT = ("detector.steps=200", "detector.batch_size=32", "train.seed=1")


def _recipe(data_dir, *more):
    return load_recipe(
        RECIPES / "tiny.toml", [f"data.path='{data_dir}'", "distill.modality=none", *more]
    )


@pytest.fixture(scope="module")
def fitted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "detector"
    report = fit_detector(_recipe(data_dir, *FIT), out, progress=False)
    return out, report


def test_targets_mark_every_cell_of_each_object(data_dir):
    split = load_prepared(data_dir)["val"]
    categories = sorted({c for o in split["objects"] for c in o["category"]})
    images = DetectionImages(split, categories, image_size=64, grid=8, stride=8)
    image, mask, obj, cat, box, centre = images[0]
    objects = split[0]["objects"]
    assert image.shape == (3, 64, 64) and not mask.any()
    assert int(centre.sum()) == len(objects["category"])  # shapes never overlap
    for name, (x1, y1, x2, y2) in zip(objects["category"], objects["bbox"], strict=True):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        cell = int(cy // 8) * 8 + int(cx // 8)
        assert centre[cell] and obj[cell] == 1 and categories[cat[cell]] == name
        assert box[cell].tolist() == pytest.approx(
            [cx / 64, cy / 64, (x2 - x1) / 64, (y2 - y1) / 64]
        )
        # A cell whose centre lies inside the box belongs to the object too.
        inside = [
            r * 8 + c
            for r in range(8)
            for c in range(8)
            if x1 <= c * 8 + 4 <= x2 and y1 <= r * 8 + 4 <= y2
        ]
        assert all(obj[i] == 1 and cat[i] == cat[cell] for i in inside)
    assert (cat[obj == 0] == -100).all() and obj.sum() >= centre.sum()


def test_cached_images_give_the_same_targets(data_dir):
    split = load_prepared(data_dir)["val"]
    categories = sorted({c for o in split["objects"] for c in o["category"]})
    decoded = DetectionImages(split, categories, image_size=64, grid=8, stride=8)
    cached = DetectionImages(split, categories, image_size=64, grid=8, stride=8)
    cached.load_cache(num_workers=0)
    assert cached.cache is not None and len(cached.cache[0]) == len(decoded)
    for k in (0, len(decoded) - 1):
        want, got = decoded[k], cached[k]
        assert got[0].dtype == torch.uint8 and torch.equal(got[0], want[0])  # kept as pixels
        assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:], strict=True))


def test_images_over_the_cache_limit_are_decoded_per_item(data_dir, monkeypatch):
    from vgdistill.data import decoded

    split = load_prepared(data_dir)["val"]
    categories = sorted({c for o in split["objects"] for c in o["category"]})
    images = DetectionImages(split, categories, image_size=64, grid=8, stride=8)
    monkeypatch.setattr(decoded, "CACHE_LIMIT_BYTES", len(images) * 3 * 64 * 64 * 2 - 1)
    images.load_cache(num_workers=0)
    assert images.cache is None and images[0][0].dtype == torch.uint8


def test_detector_learns_to_find_objects(fitted):
    out, report = fitted
    first, last = report["history"][0], report["history"][-1]
    assert last["step"] == 200 and not report["reused"]
    # 48 categories (size x colour x shape): chance is about 0.02.
    assert last["val_category_acc"] > 0.2
    assert last["val_found50"] > first["val_found50"] or first["val_found50"] > 0.5
    assert report["metrics"]["objects"] > 100
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["complete"] and len(saved["categories"]) == 48


def test_weights_use_detr_names_and_load_into_the_student(fitted, data_dir):
    out, _ = fitted
    state = load_state_file(out / WEIGHTS_FILE)
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"backbone", "input_proj", "transformer"}
    assert any(k.startswith("transformer.encoder.layers.0.") for k in state)
    model = build_model(_recipe(data_dir, f"model.detr_checkpoint='{out / WEIGHTS_FILE}'"))
    own = model.visual.state_dict()
    assert torch.equal(
        own["encoder.layers.0.linear1.weight"], state["transformer.encoder.layers.0.linear1.weight"]
    )
    assert torch.equal(
        own["backbone.body.stem.conv.weight"], state["backbone.0.body.stem.conv.weight"]
    )


def test_rerun_reuses_other_settings_refuse_force_retrains(fitted, data_dir):
    out, report = fitted
    stamp = (out / WEIGHTS_FILE).stat().st_mtime_ns
    again = fit_detector(_recipe(data_dir, *FIT), out)
    assert again["reused"] and (out / WEIGHTS_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(VGError, match="other settings"):
        fit_detector(_recipe(data_dir, *FIT, "detector.steps=3"), out)


def test_cli_writes_a_detector_and_says_how_to_use_it(data_dir, tmp_path):
    out = tmp_path / "d"
    argv = ["detector", str(RECIPES / "tiny.toml"), "--set", f"data.path='{data_dir}'"]
    result = runner.invoke(app, [*argv, "--out", str(out), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert "objects found@0.5" in result.output
    assert f"model.detr_checkpoint={out / WEIGHTS_FILE}" in result.output.replace("\n", "")
    stamp = (out / WEIGHTS_FILE).stat().st_mtime_ns
    forced = runner.invoke(app, [*argv, "--out", str(out), "--steps", "5", "--force"])
    assert forced.exit_code == 0 and (out / WEIGHTS_FILE).stat().st_mtime_ns != stamp


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_bad_inputs_are_one_line_errors(data_dir, tmp_path):
    no_objects = tmp_path / "refs"
    no_objects.mkdir()
    recipe = str(RECIPES / "tiny.toml")
    line = _one_line_error(
        runner.invoke(app, ["detector", recipe, "--set", f"data.path='{tmp_path / 'none'}'"])
    )
    assert "does not exist" in line
    line = _one_line_error(
        runner.invoke(app, ["detector", recipe, "--set", f"data.path='{data_dir}'", "--steps", "0"])
    )
    assert "--steps must be > 0" in line
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    argv = ["detector", recipe, "--set", f"data.path='{data_dir}'", "--out", str(occupied)]
    line = _one_line_error(runner.invoke(app, argv))
    assert "not a detector folder" in line and (occupied / "notes.txt").read_text() == "mine"


def test_dataset_without_object_boxes_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    from vgdistill.data.sources import SOURCES, RawRow, Source

    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    rows = [
        RawRow(str(img), "the red square", (1.0, 1.0, 20.0, 20.0), "a", split, split)
        for split in ("train", "val")
    ]
    source = Source("plain", "test rows", (), lambda args: [img], lambda args: iter(rows))
    monkeypatch.setitem(SOURCES, "plain", source)
    out = tmp_path / "plain"
    prepare("plain", SourceArgs(), out, progress=False)
    with pytest.raises(VGError, match="no object boxes"):
        fit_detector(_recipe(out, "detector.steps=1"), tmp_path / "det")


def test_train_names_the_missing_detector_then_runs_once_it_exists(fitted, data_dir, tmp_path):
    out, _ = fitted
    run = tmp_path / "run"
    argv = ["train", str(RECIPES / "tiny.toml"), "--out", str(run), "--no-progress"]
    argv += ["--set", f"data.path='{data_dir}'", "--set", "distill.modality='none'"]
    argv += ["--set", "train.max_steps=1", "--set", "train.epochs=1"]
    missing = runner.invoke(app, [*argv, "--set", f"model.detr_checkpoint='{tmp_path / 'x'}'"])
    assert "vgdistill detector" in _one_line_error(missing)
    # Nothing was trained, so the same command runs once the weights exist (no --resume).
    ok = runner.invoke(app, [*argv, "--set", f"model.detr_checkpoint='{out / WEIGHTS_FILE}'"])
    assert ok.exit_code == 0, ok.output
    assert (run / "best" / "model.safetensors").is_file()
