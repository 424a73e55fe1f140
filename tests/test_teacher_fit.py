"""`vgdistill teacher`: a CLIP teacher fitted on a tiny prepared dataset of coloured squares.

Each image holds two squares of different colours (8 colours); its two rows are "the <colour>
square" for each, so an image has two positive phrases and a phrase many positive images. A
teacher that learned anything ranks a right phrase/image first far more often than chance; the
saved folder must load through open_clip's own entry points and vgdistill's Teacher.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vgdistill.cli.app import app

runner = CliRunner()

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "cyan": (40, 220, 230),
}
ARCH = "vgdtest-teacher-clip"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _scene(rng: random.Random, size: int = 32):
    """A grey noisy image with two squares of different colours, and its two phrases."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for _ in range(60):  # background speckle so colour is not the only pixel statistic
        x, y = rng.randrange(size), rng.randrange(size)
        v = rng.randrange(90, 170)
        draw.point((x, y), fill=(v, v, v))
    a, b = rng.sample(list(COLOURS), 2)
    side = size * 7 // 16
    left_first = rng.random() < 0.5
    xs = (rng.randrange(0, size // 2 - side + 1), rng.randrange(size // 2, size - side + 1))
    rows = []
    for k, colour in enumerate((a, b)):
        x = xs[k] if left_first else xs[1 - k]
        y = rng.randrange(0, size - side + 1)
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
        rows.append((f"the {colour} square", [x, y, x + side, y + side]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), rows


def make_dataset(folder: Path, counts: dict[str, int], seed: int = 0) -> None:
    """A prepared-dataset folder of generated scenes, written by `prepare`."""
    from vgdistill.data.prepare import prepare
    from vgdistill.data.sources import RawRow, Source, SourceArgs

    rng = random.Random(seed)
    rows = []
    for split, n_images in counts.items():
        for i in range(n_images):
            png, phrases = _scene(rng)
            for j, (text, box) in enumerate(phrases):
                box = tuple(float(v) for v in box)
                rows.append(RawRow(png, text, box, f"{split}-{i}", f"{split}-{i}-{j}", split))
    source = Source("test-squares", "generated", (), lambda args: [], lambda args: iter(rows))
    prepare(source, SourceArgs(), folder, force=True, progress=False)


def write_recipe(folder: Path, data: Path, teacher: str, arch: str = ARCH) -> Path:
    """A tiny recipe whose distill.teacher is the folder to write."""
    path = folder / "recipe.toml"
    path.write_text(
        f"""
[data]
path = "{data}"
image_size = 32
max_query_len = 12
num_workers = 0

[model]
preset = "tiny"

[distill]
teacher = "{teacher}"
teacher_pretrained = ""
teacher_arch = "{arch}"

[train]
seed = 3
epochs = 1
"""
    )
    return path


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """Register a tiny open_clip config from a temp JSON file."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip_cfg")
    (folder / f"{ARCH}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / f"{ARCH}.json")
    return ARCH


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """150 train images (300 rows) and 40 val images (80 rows)."""
    folder = tmp_path_factory.mktemp("squares") / "data"
    make_dataset(folder, {"train": 150, "val": 40})
    return folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_arch, data_dir):
    """Fit once through the CLI; later tests read the folder it wrote."""
    work = tmp_path_factory.mktemp("fit")
    out = work / "teacher"
    recipe = write_recipe(work, data_dir, str(out))
    argv = ["teacher", str(recipe), "--epochs", "8", "--batch-size", "8", "--lr", "3e-3"]
    t0 = time.perf_counter()
    result = runner.invoke(app, argv)
    elapsed = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    return {"out": out, "recipe": recipe, "argv": argv, "output": result.output, "time": elapsed}


def test_fit_writes_an_open_clip_local_dir_folder(fitted):
    out = fitted["out"]
    assert (out / "open_clip_config.json").is_file()
    assert (out / "open_clip_model.safetensors").is_file()
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == TINY_CLIP
    assert cfg["preprocess_cfg"]["size"] in (32, [32, 32])
    report = json.loads((out / "teacher.json").read_text())
    assert report["complete"] is True
    assert report["data"]["train_images"] == 150 and report["data"]["val_rows"] == 80
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    # no temp folders left beside the output
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".teacher.")] in (
        [],
        [".teacher.lock"],
    )


def test_loss_falls_and_retrieval_beats_chance(fitted):
    report = json.loads((fitted["out"] / "teacher.json").read_text())
    history = report["history"]
    # ln(8) = 2.08 for a blind model; another image in the batch showing the same colour
    # is a false negative, so the loss cannot approach 0 on this data
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.25, history
    after, before = report["metrics"]["after"], report["metrics"]["before"]
    for key in ("i2t", "t2i"):
        assert after[f"{key}_r1"] >= after[f"{key}_chance"] + 0.25, after
        assert after[f"{key}_r1"] > before[f"{key}_r1"]
    # 8 phrase texts; each image carries 2 of them, each text is on about 2/8 of the images
    assert after["texts"] == 8
    assert after["i2t_chance"] == pytest.approx(2 / 8)
    assert after["t2i_chance"] == pytest.approx(2 / 8, abs=0.08)
    assert "phrase -> image" in fitted["output"] and "chance R@1" in fitted["output"]


def test_saved_teacher_loads_through_open_clip_with_identical_embeddings(fitted, data_dir):
    import open_clip
    import torch

    out = fitted["out"]
    a = open_clip.create_model(f"local-dir:{out}").eval()
    b = open_clip.create_model(ARCH, pretrained=str(out / "open_clip_model.safetensors")).eval()
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    images = torch.rand(3, 3, 32, 32)
    text = tok(["the red square", "the blue square"])
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(text), b.encode_text(text))

    # the loaded weights reproduce the retrieval the fit reported (same embeddings as trained)
    from vgdistill.data.pairs import load_split_pairs
    from vgdistill.evaluation.retrieval import evaluate_retrieval
    from vgdistill.models.teacher import Teacher

    report = json.loads((out / "teacher.json").read_text())
    recipe = _load(fitted["recipe"])
    split = load_split_pairs(recipe, recipe.data.val_split)
    teacher = Teacher(a, tok, TINY_CLIP, trainable=True, precision="fp32")
    again = evaluate_retrieval(teacher, split, torch.device("cpu"))
    for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):
        assert again[k] == pytest.approx(report["metrics"]["after"][k], abs=1e-6)


def test_recipe_teacher_loads_the_fitted_folder(fitted):
    """distill.teacher = FOLDER: the distillation Teacher builds it and embeds as open_clip."""
    import open_clip
    import torch

    from vgdistill.models.teacher import Teacher

    recipe = _load(fitted["recipe"])
    teacher = Teacher.from_config(recipe.distill)
    assert teacher.frozen and teacher.embed_dim == TINY_CLIP["embed_dim"]
    ref = open_clip.create_model(f"local-dir:{fitted['out']}").eval()
    student_frames = torch.randn(2, 3, 32, 32)  # ImageNet-normalised, already 32 x 32
    phrases = ["the red square", "the green square"]
    img, txt = teacher.encode(student_frames, phrases)
    with torch.no_grad():
        want_img = ref.encode_image(teacher.image_input(student_frames))
        want_txt = ref.encode_text(open_clip.get_tokenizer(f"local-dir:{fitted['out']}")(phrases))
    assert torch.allclose(img, want_img, atol=1e-6) and torch.allclose(txt, want_txt, atol=1e-6)


def _load(recipe_path: Path):
    from vgdistill.recipe import load_recipe

    return load_recipe(recipe_path)


def test_rerun_reuses_the_finished_teacher_and_force_refits(fitted, tmp_path):
    out = fitted["out"]
    stamp = (out / "open_clip_model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = runner.invoke(app, fitted["argv"])
    assert again.exit_code == 0, again.output
    assert time.perf_counter() - t0 < fitted["time"]
    assert (out / "open_clip_model.safetensors").stat().st_mtime_ns == stamp
    assert "already holds this teacher" in again.output

    other = runner.invoke(app, [*fitted["argv"][:-2], "--lr", "1e-3"])
    assert other.exit_code == 2
    assert "other settings" in other.output and "--force" in other.output

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    forced = runner.invoke(
        app, [*fitted["argv"][:2], "--out", str(copy), "--epochs", "1", "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 1


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_dataset_is_a_one_line_error(tmp_path, tiny_arch):
    recipe = write_recipe(tmp_path, tmp_path / "nowhere", str(tmp_path / "teacher"))
    line = _one_line_error(runner.invoke(app, ["teacher", str(recipe)]))
    assert "nowhere" in line
    assert not (tmp_path / "teacher").exists()


def test_unknown_model_name_is_a_one_line_error(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir, str(tmp_path / "teacher"), arch="ViT-Q-99")
    line = _one_line_error(runner.invoke(app, ["teacher", str(recipe)]))
    assert "ViT-Q-99" in line and "open_clip" in line


def test_missing_split_and_bad_init_are_one_line_errors(tmp_path, tiny_arch, data_dir):
    recipe = write_recipe(tmp_path, data_dir, str(tmp_path / "teacher"))
    line = _one_line_error(
        runner.invoke(app, ["teacher", str(recipe), "--set", "data.val_split=testB"])
    )
    assert "testB" in line
    line = _one_line_error(
        runner.invoke(app, ["teacher", str(recipe), "--init", str(tmp_path / "w.safetensors")])
    )
    assert "not found" in line


def test_fit_can_start_from_a_saved_teacher_folder(fitted, tmp_path):
    out = tmp_path / "adapted"
    result = runner.invoke(
        app,
        [
            "teacher",
            str(fitted["recipe"]),
            "--init",
            str(fitted["out"]),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "teacher.json").read_text())
    before = json.loads((fitted["out"] / "teacher.json").read_text())["metrics"]["after"]
    # starting from the fitted weights, "before" is the fitted teacher's own score
    assert report["metrics"]["before"]["t2i_r1"] == pytest.approx(before["t2i_r1"], abs=1e-6)


def test_distinct_batches_never_repeat_an_image_or_a_phrase():
    from vgdistill.data.pairs import distinct_batches

    rng = random.Random(0)
    image_of_row = [i // 3 for i in range(300)]  # 100 images x 3 phrases
    phrases = [f"phrase {rng.randrange(40)}" for _ in range(300)]
    batches = distinct_batches(image_of_row, phrases, 16, random.Random(1))
    seen = [r for b in batches for r in b]
    assert len(seen) == len(set(seen)) and len(seen) >= 298  # at most a lone row dropped
    for b in batches:
        assert len({image_of_row[r] for r in b}) == len(b)
        assert len({phrases[r] for r in b}) == len(b)
        assert 2 <= len(b) <= 16
    assert sum(len(b) == 16 for b in batches) >= len(batches) - 9


def test_retrieval_metrics_by_hand():
    import torch

    from vgdistill.evaluation.retrieval import retrieval_metrics

    e = torch.eye(3)
    img = e  # 3 images
    # 4 texts: image 0 carries texts {0, 1}, image 1 {2}, image 2 {3}
    txt = torch.stack([e[0], e[2], e[1], 0.5 * e[1]])
    m = retrieval_metrics(img, txt, [{0, 1}, {2}, {3}])
    # image 0 -> text 0 (hit), image 1 -> text 2 (hit), image 2 -> text 1 (image 0's: miss)
    assert m["i2t_r1"] == pytest.approx(2 / 3)
    # text 0 -> image 0 (hit), text 1 -> image 2 (miss), text 2 -> image 1 (hit), 3 -> 1 (miss)
    assert m["t2i_r1"] == pytest.approx(2 / 4)
    assert m["i2t_chance"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert m["t2i_chance"] == pytest.approx(1 / 3)
    assert m["i2t_r5"] == 1.0 and m["t2i_r5"] == 1.0


def test_architecture_and_output_folder_come_from_the_recipe(tmp_path):
    from vgdistill.errors import VGError
    from vgdistill.models.clip_source import resolve_source
    from vgdistill.recipe import load_recipe
    from vgdistill.training.teacher import default_out

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"
    # distill.teacher names an open_clip model: fit it, write runs/teacher-<recipe name>
    named = load_recipe(
        tiny,
        [
            "distill.teacher=vgd-tiny-clip",
            "distill.teacher_pretrained=''",
            "distill.teacher_arch=''",
        ],
    )
    source = resolve_source(named)
    assert source.arch == "vgd-tiny-clip" and source.weights == ""
    assert default_out(named, tiny) == Path("runs/teacher-tiny")

    # distill.teacher names a folder: that is the output, and teacher_arch says what to fit
    folder = load_recipe(tiny, [f"distill.teacher={tmp_path / 't'}", "distill.teacher_arch=''"])
    assert default_out(folder, tiny) == tmp_path / "t"
    with pytest.raises(VGError, match="teacher_arch"):
        resolve_source(folder)
    arch = load_recipe(
        tiny, [f"distill.teacher={tmp_path / 't'}", "distill.teacher_arch=vgd-tiny-clip"]
    )
    assert resolve_source(arch).arch == "vgd-tiny-clip"
    # the shipped demo recipe: fit vgd-tiny-clip into its distill.teacher folder
    demo = load_recipe(tiny)
    assert resolve_source(demo).arch == "vgd-tiny-clip"
    assert default_out(demo, tiny) == Path(demo.distill.teacher)

    # an --init folder without weights would silently start from random: refused
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}})
    )
    with pytest.raises(VGError, match="no open_clip weights"):
        resolve_source(arch, init=str(tmp_path / "empty"))


def test_flip_only_augmentation_decodes_each_image_once_with_both_flips(data_dir, tmp_path):
    import torch

    from vgdistill.data.pairs import load_split_pairs
    from vgdistill.data.transforms import GroundingTransform
    from vgdistill.models.visual import normalize_pixels
    from vgdistill.recipe import load_recipe

    path = write_recipe(tmp_path, data_dir, str(tmp_path / "t"))
    recipe = load_recipe(path, ["data.augment=true", 'data.augment_ops=["flip"]'])
    frames = load_split_pairs(recipe, "val", augment=True).frames
    assert frames.cache is not None and frames.cache.shape == (40, 2, 3, 32, 32)
    row = frames.ds[0]
    img = frames.images.load_row(row, "val row 0")
    transform = GroundingTransform(32, augment=False)
    fixed = [transform.fixed(img, [0, 0, 32, 32], "", f) for f in (False, True)]
    # Frames hand the teacher ImageNet-normalised floats, whatever dtype the transform gives.
    forms = [normalize_pixels(out.image, out.mask) for out in fixed]
    frames.table.phrases[0] = "the left square"
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        image, phrase = frames[0]
        flipped = phrase == "the right square"
        assert phrase in ("the left square", "the right square")
        assert torch.allclose(image, forms[flipped], atol=1e-2)  # float16 in memory
        seen.add(flipped)
    assert seen == {False, True}
    # Random ops other than flips change the pixels at every visit: nothing is kept.
    resized = load_recipe(path, ["data.augment=true", 'data.augment_ops=["flip", "resize"]'])
    assert load_split_pairs(resized, "val", augment=True).frames.cache is None
