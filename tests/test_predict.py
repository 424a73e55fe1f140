"""`vgdistill predict` and the Grounder API on a saved tiny checkpoint (random weights)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.report.draw import colour_for, draw_boxes, text_colour
from vgdistill.tools.grounder import Grounder, attention_heat

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint folder written by the real save path."""
    from vgdistill.models.checkpoint import save_checkpoint
    from vgdistill.models.factory import build_model
    from vgdistill.recipe import load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes/tiny.toml", ["distill.modality=none"])
    model = build_model(recipe, load_weights=False)
    folder = tmp_path_factory.mktemp("ckpt") / "best"
    save_checkpoint(model, recipe, folder)
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A non-square image (so the eval padding matters) with some texture."""
    rng = np.random.default_rng(0)
    arr = rng.integers(60, 200, size=(72, 120, 3), dtype=np.uint8)
    arr[20:50, 30:70] = (200, 30, 30)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(arr).save(path)
    return path


def _one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_predict_json_box_inside_image_and_png_drawn(ckpt, photo, tmp_path):
    out = tmp_path / "drawn.png"
    result = runner.invoke(
        app, ["predict", str(ckpt), str(photo), "the red block", "--json", "-", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    (pred,) = record["predictions"]
    x1, y1, x2, y2 = pred["box"]
    assert (record["width"], record["height"]) == (120, 72)
    assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 72
    assert x2 - x1 >= 2 and y2 - y1 >= 2  # a random model still predicts a real box

    drawn = Image.open(out)
    assert drawn.size == (120, 72) and drawn.mode == "RGB"
    before = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    after = np.asarray(drawn).astype(int)
    changed = np.abs(after - before).sum(-1) > 0
    # The box outline: the middle of its left and right edges and of its bottom edge changed.
    mid_y, mid_x = round((y1 + y2) / 2), round((x1 + x2) / 2)
    left, right, bottom = round(x1), max(round(x1), round(x2) - 1), max(round(y1), round(y2) - 1)
    assert changed[mid_y, left] and changed[mid_y, right] and changed[bottom, mid_x]
    # ...and the drawing stays local: the box interior away from the label is untouched.
    inner = changed[round(y1) + 4 : bottom - 3, left + 4 : right - 3]
    assert inner.size == 0 or inner.mean() < 0.2


def test_cli_table_and_python_api_agree(ckpt, photo, tmp_path):
    grounder = Grounder.from_pretrained(ckpt, "cpu")
    boxes = grounder.predict(photo, ["the red block", "the grey background"])
    assert len(boxes) == 2 and all(len(b) == 4 for b in boxes)
    # The same image given as a PIL image or as bytes grounds identically.
    assert grounder.predict(Image.open(photo), "the red block")[0] == pytest.approx(boxes[0])
    assert grounder.predict(photo.read_bytes(), ["the red block"])[0] == pytest.approx(boxes[0])
    result = runner.invoke(app, ["predict", str(ckpt), str(photo), "the red block", "--json", "-"])
    assert json.loads(result.stdout)["predictions"][0]["box"] == pytest.approx(boxes[0], abs=0.01)
    table = runner.invoke(app, ["predict", str(ckpt.parent), str(photo), "the red block"])
    assert table.exit_code == 0 and "the red block" in table.stdout  # a run folder works too
    assert f"{boxes[0][0]:.1f}" in table.stdout


def test_predict_matches_the_evaluation_pipeline(ckpt, tmp_path):
    """A prediction equals what `eval` scores for the same image and phrase: the eval
    transform, tokenization and mapping back, with the visual branch run per row as the
    per-row eval path does (the Grounder shares one pass across the phrases)."""
    from vgdistill.data.loader import collate, encode_phrase
    from vgdistill.data.transforms import GroundingTransform
    from vgdistill.evaluation.protocol import to_original_xyxy

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    path = tmp_path / "x.png"
    img.save(path)
    grounder = Grounder.from_pretrained(ckpt, "cpu")
    recipe = grounder.recipe
    phrases = ["the left thing", "the top right corner", "a thing"]
    transform = GroundingTransform(recipe.data.image_size, augment=False)
    samples = []
    for phrase in phrases:
        t = transform(img, [1.0, 2.0, 30.0, 40.0], phrase)
        ids, mask = encode_phrase(grounder.tokenizer, t.phrase, recipe.data.max_query_len)
        samples.append(
            {
                "image": t.image,
                "image_mask": t.mask,
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.tensor(mask),
                "scale": torch.tensor(t.scale),
                "pad": torch.tensor(t.pad),
                "orig_size": torch.tensor([img.width, img.height]),
            }
        )
    batch = collate(samples)
    with torch.no_grad():
        out = grounder.model(
            batch["image"], batch["image_mask"], batch["input_ids"], batch["attention_mask"]
        )
    expected = to_original_xyxy(
        out.pred_boxes, recipe.data.image_size, batch["scale"], batch["pad"], batch["orig_size"]
    )
    got = grounder.predict(path, phrases)
    assert np.allclose(got, expected.numpy(), atol=1e-3)


def test_show_attention_overlays_a_heat_map(ckpt, photo, tmp_path):
    plain, heat = tmp_path / "plain.png", tmp_path / "heat.png"
    args = ["predict", str(ckpt), str(photo), "the red block"]
    assert runner.invoke(app, [*args, "--out", str(plain)]).exit_code == 0
    result = runner.invoke(app, [*args, "--out", str(heat), "--show-attention"])
    assert result.exit_code == 0, result.output
    a, b = np.asarray(Image.open(plain)), np.asarray(Image.open(heat))
    assert a.shape == b.shape == (72, 120, 3)
    assert (np.abs(a.astype(int) - b.astype(int)).sum(-1) > 0).mean() > 0.5  # covers the image

    (g,) = Grounder.from_pretrained(ckpt, "cpu").ground(photo, ["the red block"], attention=True)
    assert g.heat is not None and g.heat.shape == (72, 120)
    assert g.heat.min() >= 0 and g.heat.max() == pytest.approx(1.0)


def test_attention_heat_maps_token_grid_back_to_the_original_image():
    # 2x2 grid over a 64x64 padded frame; a 64x32 image sits in rows 16..48 (pad top 16).
    att = np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32)  # top-right token
    heat = attention_heat(att, (2, 2), 64, 1.0, (0.0, 16.0), (64, 32))
    assert heat.shape == (32, 64)
    assert heat[:, 48:].mean() > heat[:, :16].mean() + 0.3  # right side hot
    assert heat[:8].mean() > heat[24:].mean()  # upper image rows are nearer the hot token


def test_batch_mode_writes_jsonl_in_order(ckpt, photo, tmp_path):
    other = tmp_path / "other.jpg"
    Image.open(photo).resize((40, 60)).save(other)
    items = tmp_path / "items.jsonl"
    lines = [
        {"image": str(photo), "phrase": "the red block", "id": "a"},
        {"image": "other.jpg", "phrase": "the thing", "id": "b"},  # relative to the file
        {"image": str(photo), "phrase": "the background", "id": "c"},
    ]
    items.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "results.jsonl"
    result = runner.invoke(app, ["predict", str(ckpt), "--batch", str(items), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert [r["line"] for r in records] == [1, 2, 3]
    for r in records:
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"]
    assert (records[1]["width"], records[1]["height"]) == (40, 60)
    single = Grounder.from_pretrained(ckpt, "cpu").predict(photo, ["the background"])[0]
    assert records[2]["box"] == pytest.approx(single, abs=0.01)


def test_batch_mode_bad_line_names_it_and_writes_nothing(ckpt, photo, tmp_path):
    items = tmp_path / "items.jsonl"
    out = tmp_path / "results.jsonl"
    good = json.dumps({"image": str(photo), "phrase": "a"})
    items.write_text(good + "\n" + json.dumps({"image": str(photo), "phrase": "  "}) + "\n")
    line = _one_error_line(
        runner.invoke(app, ["predict", str(ckpt), "--batch", str(items), "--out", str(out)])
    )
    assert "line 2" in line and "empty" in line
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items.write_text(good + "\n" + good + "\n" + json.dumps({"image": str(broken), "phrase": "a"}))
    line = _one_error_line(
        runner.invoke(app, ["predict", str(ckpt), "--batch", str(items), "--out", str(out)])
    )
    assert "line 3" in line and "broken.png" in line
    items.write_text(good + "\n{not json\n")
    line = _one_error_line(
        runner.invoke(app, ["predict", str(ckpt), "--batch", str(items), "--out", str(out)])
    )
    assert "line 2" in line and "JSON" in line
    assert not out.exists() and not list(tmp_path.glob(".results.jsonl*"))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing image", "image not found"),
        ("undecodable image", "not an image"),
        ("empty phrase", "empty"),
        ("blank phrase", "empty"),
        ("no phrase", "at least one"),
        ("folder without a model", "not a checkpoint"),
        ("missing checkpoint", "checkpoint not found"),
        ("bad --out", "unknown image extension"),
        ("bad --device", "--device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, expected, ckpt, photo, tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    empty_folder = tmp_path / "empty_run"
    empty_folder.mkdir()
    args = {
        "missing image": [str(ckpt), str(tmp_path / "nope.png"), "a"],
        "undecodable image": [str(ckpt), str(garbage), "a"],
        "empty phrase": [str(ckpt), str(photo), "the cat", ""],
        "blank phrase": [str(ckpt), str(photo), "   "],
        "no phrase": [str(ckpt), str(photo)],
        "folder without a model": [str(empty_folder), str(photo), "a"],
        "missing checkpoint": [str(tmp_path / "nothing"), str(photo), "a"],
        "bad --out": [str(ckpt), str(photo), "a", "--out", str(tmp_path / "x.nope")],
        "bad --device": [str(ckpt), str(photo), "a", "--device", "tpu"],
    }[case]
    line = _one_error_line(runner.invoke(app, ["predict", *args]))
    assert expected in line


def test_drawing_colours_are_distinct_and_labels_readable():
    colours = [colour_for(i) for i in range(8)]
    assert len(set(colours)) == 8
    for c in colours:  # the label text colour contrasts with its background
        t = text_colour(c)
        assert sum(abs(a - b) for a, b in zip(c, t, strict=True)) > 200
    img = Image.new("RGB", (200, 100), (128, 128, 128))
    out = draw_boxes(img, [(10, 40, 90, 90), (100, 40, 190, 90)], ["first", "a " * 80])
    assert out.size == img.size and img.getpixel((10, 60)) == (128, 128, 128)  # input untouched
    arr = np.asarray(out)
    assert tuple(arr[60, 10]) == colours[0] and tuple(arr[60, 100]) == colours[1]
    # Label 1 sits on its colour above its box; the over-long label 2 is shortened and moved
    # left so that it stays inside the image.
    assert (arr[:38, 10:60] == colours[0]).all(-1).sum() > 50
    ys, xs = np.nonzero((arr == colours[1]).all(-1))
    assert xs.min() < 100 and xs.max() <= 199 and ys.min() < 40


# ----------------------------------------------------------------- frames, json, --set


def _exif_jpeg(path, arr, orientation):
    """Save `arr` as a JPEG whose EXIF orientation tag is `orientation`."""
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif.tobytes())


def test_predict_on_an_exif_photo_gives_boxes_in_the_upright_frame(ckpt, tmp_path):
    from PIL import ImageOps

    rng = np.random.default_rng(3)
    stored = rng.integers(40, 220, size=(72, 120, 3), dtype=np.uint8)
    stored[10:40, 70:110] = (220, 20, 20)
    photo = tmp_path / "rotated.jpg"
    _exif_jpeg(photo, stored, 6)  # stored 120x72, shown turned a quarter: 72x120
    upright = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    assert upright.size == (72, 120)
    plain = tmp_path / "upright.png"
    upright.save(plain)  # the same pixels without any tag

    out, js = tmp_path / "drawn.png", tmp_path / "boxes.json"
    args = [str(ckpt), str(photo), "the red block", "--out", str(out), "--json", str(js)]
    result = runner.invoke(app, ["predict", *args])
    assert result.exit_code == 0, result.output
    record = json.loads(js.read_text())
    assert (record["width"], record["height"], record["frame"]) == (72, 120, "upright")
    (pred,) = record["predictions"]
    x1, y1, x2, y2 = pred["box"]
    assert 0 <= x1 <= x2 <= 72 and 0 <= y1 <= y2 <= 120
    assert Image.open(out).size == (72, 120)  # drawn on the upright image
    assert "upright" in result.stdout and f"wrote {js}" in " ".join(result.stdout.split())
    # The boxes are those of the same photo handed over already upright.
    grounder = Grounder.from_pretrained(ckpt, "cpu")
    assert pred["box"] == pytest.approx(grounder.predict(plain, "the red block")[0], abs=0.05)


def test_json_dash_prints_json_and_a_path_writes_a_file(ckpt, photo, tmp_path):
    result = runner.invoke(app, ["predict", str(ckpt), str(photo), "a", "--json", "-"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # nothing but the JSON on stdout
    out = tmp_path / "sub" / "p.json"
    out.parent.mkdir()
    result = runner.invoke(app, ["predict", str(ckpt), str(photo), "a", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["predictions"] == printed["predictions"]
    assert "┃" in result.stdout or "phrase" in result.stdout  # the table is still shown


def test_predict_takes_set_for_keys_that_keep_the_model(ckpt, photo):
    phrases = ["the red block", "the grey background", "a corner"]
    base = runner.invoke(app, ["predict", str(ckpt), str(photo), *phrases, "--json", "-"])
    one = runner.invoke(
        app,
        ["predict", str(ckpt), str(photo), *phrases, "--json", "-", "--set", "eval.batch_size=1"],
    )
    assert base.exit_code == one.exit_code == 0, one.output
    a, b = json.loads(base.stdout)["predictions"], json.loads(one.stdout)["predictions"]
    assert np.allclose([p["box"] for p in a], [p["box"] for p in b], atol=0.02)
    zero = runner.invoke(app, ["predict", str(ckpt), str(photo), "a", "--set", "eval.batch_size=0"])
    assert "eval.batch_size must be > 0" in _one_error_line(zero)  # the value is applied
    assert Grounder.from_pretrained(ckpt, "cpu", ["eval.batch_size=1"]).batch_size == 1
    bad = runner.invoke(app, ["predict", str(ckpt), str(photo), "a", "--set", "model.hidden_dim=8"])
    assert "fixed by the checkpoint" in _one_error_line(bad)


def test_one_visual_pass_per_image_for_many_phrases(ckpt, photo):
    grounder = Grounder.from_pretrained(ckpt, "cpu", overrides=["eval.batch_size=2"])
    calls = []
    grounder.model.visual.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    phrases = ["the red block", "the grey background", "a corner", "the left", "x"]
    together = grounder.predict(photo, phrases)
    assert calls == [1]  # five phrases in three chunks, one pass of the visual branch
    alone = [grounder.predict(photo, p)[0] for p in phrases]
    assert np.allclose(together, alone, atol=1e-3)


# ----------------------------------------------------------------- phrases (Unicode)


@pytest.mark.parametrize(
    "phrase",
    ["\x00", "\x00\x00 \x00", "\u200b", "\u200b\u200d\ufeff", "\u202e", "...", " \t!? ", "\x7f"],
)
def test_phrases_without_letters_or_digits_are_empty(ckpt, photo, phrase):
    line = _one_error_line(runner.invoke(app, ["predict", str(ckpt), str(photo), phrase]))
    assert "phrase is empty" in line and "no letters or digits" in line


def test_phrases_are_nfkc_normalised(ckpt, photo):
    from vgdistill.tools.grounder import check_phrases

    assert check_phrases(["ｔｈｅ　ｒｅｄ　ｂｌｏｃｋ", "the\u200b red\x00 ﬁsh"]) == [
        "the red block",
        "the red fish",
    ]
    grounder = Grounder.from_pretrained(ckpt, "cpu")
    (wide,) = grounder.ground(photo, "ｔｈｅ ｒｅｄ ｂｌｏｃｋ")
    assert wide.phrase == "the red block"
    assert wide.box == pytest.approx(grounder.predict(photo, "the red block")[0], abs=1e-4)
    assert check_phrases(["7"]) == ["7"] and check_phrases(["猫"]) == ["猫"]


def test_a_lone_surrogate_is_a_clear_error(ckpt, photo):
    from vgdistill.tools.grounder import InvalidText

    grounder = Grounder.from_pretrained(ckpt, "cpu")
    with pytest.raises(InvalidText, match="U\\+D800"):
        grounder.predict(photo, ["fine", "bad \ud800 text"])
    line = _one_error_line(runner.invoke(app, ["predict", str(ckpt), str(photo), "a \udcff"]))
    assert "phrase holds the invalid code point U+DCFF" in line


def test_batch_line_with_a_lone_surrogate_is_reported_and_the_rest_goes_on(ckpt, photo, tmp_path):
    items = tmp_path / "items.jsonl"
    lines = [
        {"image": str(photo), "phrase": "the red block", "id": "a"},
        {"image": str(photo), "phrase": "broken \ud800 text", "id": "b"},
        {"image": str(photo) + "\udc80", "phrase": "a box", "id": "c"},
        {"image": str(photo), "phrase": "the background", "id": "d"},
    ]
    items.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out, summary = tmp_path / "results.jsonl", tmp_path / "summary.json"
    args = ["predict", str(ckpt), "--batch", str(items), "--out", str(out)]
    result = runner.invoke(app, [*args, "--json", str(summary)])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c", "d"]
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert "box" in records[0] and "box" in records[3]
    assert "line 2" in records[1]["error"] and "U+D800" in records[1]["error"]
    assert "line 3" in records[2]["error"] and "'image'" in records[2]["error"]
    assert "box" not in records[1] and "box" not in records[2]
    stderr = " ".join(result.stderr.split())
    assert "line 2" in stderr and "line 3" in stderr
    assert json.loads(summary.read_text()) == {"out": str(out), "lines": 4, "errors": 2}
