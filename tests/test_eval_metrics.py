"""Evaluation: the two scoring protocols against the TransVG reference's formulas, box mapping,
batches grouped by image with one visual pass per image, de-duplication, the shuffle control,
`eval --set`, refusing non-finite predictions, exact counts under two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.data.transforms import GroundingTransform
from vgdistill.evaluation.evaluate import shuffle_phrases
from vgdistill.evaluation.protocol import row_ious, to_original_xyxy, xyxy_rows
from vgdistill.evaluation.shared import first_occurrence, image_batches
from vgdistill.report.tables import results_table

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ----------------------------------------------------------------- the reference's formulas
# Written out from djiajunustc/TransVG: datasets/data_loader.py (pull_item),
# datasets/transforms.py (RandomResize with the long side, NormalizeAndPad), utils/box_utils.py
# (xywh2xyxy, bbox_iou) and utils/eval_utils.py (trans_vg_eval_test).


def reference_target(annotation, xyxy_source: bool, width: int, height: int, size: int):
    """The reference's eval target: normalised cx, cy, w, h in the padded size x size frame."""
    box = np.array(annotation, dtype=int)  # the split file's box, truncated to integers
    if not xyxy_source:  # RefCOCO family: x, y, w, h -> x1, y1, x2, y2 on the integers
        box[2], box[3] = box[0] + box[2], box[1] + box[3]
    box = torch.tensor(box).float()
    ratio = float(size / float(max(height, width)))  # resize the long side to `size`
    new_w, new_h = round(width * ratio), round(height * ratio)
    box = box * ratio
    left, top = round((size - new_w) / 2.0 - 0.1), round((size - new_h) / 2.0 - 0.1)
    box = box + torch.tensor([left, top, left, top], dtype=torch.float32)
    x1, y1, x2, y2 = box.tolist()
    cxcywh = torch.tensor([(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1])
    return cxcywh / torch.tensor([size, size, size, size], dtype=torch.float32)


def reference_iou(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> float:
    """IoU as the reference scores it: both boxes to corners, the prediction clamped to
    [0, 1], intersection over union with 1e-16 added to the denominator."""

    def corners(b):
        return torch.stack(
            [b[0] - 0.5 * b[2], b[1] - 0.5 * b[3], b[0] + 0.5 * b[2], b[1] + 0.5 * b[3]]
        )

    p = torch.clamp(corners(pred_cxcywh), 0, 1)
    g = corners(target_cxcywh)
    iw = torch.clamp(torch.min(p[2], g[2]) - torch.max(p[0], g[0]), 0)
    ih = torch.clamp(torch.min(p[3], g[3]) - torch.max(p[1], g[1]), 0)
    inter = iw * ih
    area_p = (p[2] - p[0]) * (p[3] - p[1])
    area_g = (g[2] - g[0]) * (g[3] - g[1])
    return float(inter / (area_p + area_g - inter + 1e-16))


def pixel_iou(pred_cxcywh, box_xyxy, width, height, size) -> float:
    """Today's "pixels" scoring, written out: the prediction mapped back to the image through
    the eval transform's scale and pad, clamped to the image, IoU with the float box."""
    t = GroundingTransform(size, augment=False)(Image.new("RGB", (width, height)), None, "")
    cx, cy, w, h = (pred_cxcywh * size).tolist()
    p = [(cx - w / 2 - t.pad[0]) / t.scale, (cy - h / 2 - t.pad[1]) / t.scale]
    p += [(cx + w / 2 - t.pad[0]) / t.scale, (cy + h / 2 - t.pad[1]) / t.scale]
    p = [min(max(p[0], 0), width), min(max(p[1], 0), height)] + [
        min(max(p[2], 0), width),
        min(max(p[3], 0), height),
    ]
    g = box_xyxy
    iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
    ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    return inter / union


def scored(annotation, xyxy_source, width, height, size, pred_cxcywh, source="refcoco"):
    """(transvg IoU, pixels IoU) from vgdistill's scoring of one prepared row."""
    a = [float(v) for v in annotation]
    # What prepare stores: float32 pixel xyxy (x, y, w, h sources converted).
    xyxy = a if xyxy_source else [a[0], a[1], a[0] + a[2], a[1] + a[3]]
    t = GroundingTransform(size, augment=False)(Image.new("RGB", (width, height)), None, "")
    batch = {
        "orig_boxes": torch.tensor([xyxy], dtype=torch.float32),
        "scale": torch.tensor([t.scale], dtype=torch.float32),
        "pad": torch.tensor([t.pad], dtype=torch.float32),
        "orig_size": torch.tensor([[width, height]]),
    }
    rule = xyxy_rows([source], 1)
    pred = pred_cxcywh.view(1, 4)
    transvg = float(row_ious("transvg", pred, batch, rule, size)[0])
    pixels = float(row_ious("pixels", pred, batch, rule, size)[0])
    return transvg, pixels, xyxy


def test_prediction_in_the_padding_counts_against_it_under_transvg():
    # A 200x100 image at S=64: scale 0.32, 64x32 pixels placed 16 rows down (padding above).
    # The ground truth is the top-left quarter; the prediction also covers padding above it.
    size, w, h = 64, 200, 100
    annotation = [0, 0, 100, 50]  # x, y, w, h
    pred = torch.tensor([16.0, 16.5, 32.0, 33.0]) / size  # x 0..32, y 0..33 in the square
    transvg, pixels, xyxy = scored(annotation, False, w, h, size, pred)
    ref = reference_iou(pred, reference_target(annotation, False, w, h, size))
    assert transvg == pytest.approx(ref, abs=1e-6)
    assert transvg < 0.5 <= pixels  # the protocols disagree at Acc@0.5: 0.485 and 0.941
    assert pixels == pytest.approx(pixel_iou(pred, xyxy, w, h, size), abs=1e-5)


def test_fractional_ground_truth_is_truncated_as_the_reference_loader_does():
    # COCO box x, y, w, h = 10.9, 10.9, 20.95, 20.95: the reference keeps 10, 10, 20, 20.
    size, w, h = 640, 640, 640
    annotation = [10.9, 10.9, 20.95, 20.95]
    pred = torch.tensor([20.0, 20.0, 14.2, 14.2]) / size  # inside the integer box
    transvg, pixels, xyxy = scored(annotation, False, w, h, size, pred)
    ref = reference_iou(pred, reference_target(annotation, False, w, h, size))
    assert transvg == pytest.approx(ref, abs=1e-6)
    assert pixels == pytest.approx(pixel_iou(pred, xyxy, w, h, size), abs=1e-5)
    assert pixels < 0.5 <= transvg  # 201.64 / 400 on the integers, / 438.9 on the floats


def test_xyxy_sources_truncate_each_corner():
    # ReferItGame / Flickr30k split files hold x1, y1, x2, y2: int(x2), not int(x1) + int(w).
    size, w, h = 64, 90, 50
    annotation = [3.7, 4.2, 40.6, 30.5]
    pred = torch.tensor([0.35, 0.45, 0.45, 0.35])
    for source in ("referit", "flickr30k"):
        transvg, _, _ = scored(annotation, True, w, h, size, pred, source=source)
        ref = reference_iou(pred, reference_target(annotation, True, w, h, size))
        assert transvg == pytest.approx(ref, abs=1e-6)
    # Read as a COCO-family box, x2 = 3 + int(36.9) = 39 instead of 40: another target.
    coco = reference_target([3.7, 4.2, 36.9, 26.3], False, w, h, size)
    assert not torch.allclose(coco, reference_target(annotation, True, w, h, size))


def test_random_rows_match_the_reference_bit_for_bit_at_acc50():
    """Many random rows (sizes, boxes with two decimals, predictions near the boxes): the
    transvg protocol agrees with the reference formulas on every Acc@0.5 decision."""
    rng = np.random.default_rng(0)
    size = 640
    decisions = []
    for _ in range(300):
        w, h = int(rng.integers(40, 1000)), int(rng.integers(40, 1000))
        xyxy_source = bool(rng.integers(0, 2))
        x, y = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
        bw, bh = rng.uniform(1, w - x), rng.uniform(1, h - y)
        annotation = np.round([x, y, bw, bh], 2)
        if xyxy_source:
            annotation = np.round([x, y, x + bw, y + bh], 2)
        target = reference_target(annotation, xyxy_source, w, h, size)
        pred = (target + torch.tensor(rng.normal(0, 0.04, 4), dtype=torch.float32)).abs()
        source = "referit" if xyxy_source else "refcocog"
        transvg, _, _ = scored(annotation, xyxy_source, w, h, size, pred, source=source)
        ref = reference_iou(pred, target)
        assert transvg == pytest.approx(ref, abs=1e-5)
        assert (transvg >= 0.5) == (ref >= 0.5)
        decisions.append(ref >= 0.5)
    assert 0.2 < np.mean(decisions) < 0.8  # the draws do straddle the threshold


def test_prediction_maps_back_to_original_pixels():
    # A 200x100 image resized by 0.32 to 64x32 and padded to 64x64 with 16 px on top.
    scale = torch.tensor([0.32])
    pad = torch.tensor([[0.0, 16.0]])
    orig_size = torch.tensor([[200, 100]])
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0]])  # original xyxy
    padded = box * 0.32 + torch.tensor([0.0, 16.0, 0.0, 16.0])
    cxcywh = torch.cat([(padded[:, :2] + padded[:, 2:]) / 2, padded[:, 2:] - padded[:, :2]], 1)
    back = to_original_xyxy(cxcywh / 64, 64, scale, pad, orig_size)
    assert torch.allclose(back, box, atol=1e-4)
    # Parts outside the image (in the padding) are clipped to it.
    far = to_original_xyxy(torch.tensor([[0.5, 0.05, 1.0, 0.1]]), 64, scale, pad, orig_size)
    assert far[0, 1] == 0 and far[0, 2] == 200


def test_non_finite_prediction_scores_nan():
    batch = {
        "orig_boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2),
        "scale": torch.ones(2),
        "pad": torch.zeros(2, 2),
        "orig_size": torch.tensor([[10, 10]] * 2),
    }
    pred = torch.tensor([[0.5, 0.5, 1.0, 1.0], [float("nan"), 0.5, 1.0, 1.0]])
    for protocol in ("transvg", "pixels"):
        iou = row_ious(protocol, pred, batch, torch.zeros(2, dtype=torch.bool), 10)
        assert iou[0] == pytest.approx(1.0) and torch.isnan(iou[1])


# ----------------------------------------------------------------- grouping by image


def test_first_occurrence_deduplicates_padded_rows():
    index = torch.tensor([4, 0, 2, 4, 1, 0, 3])
    unique, first, inverse = first_occurrence(index)
    assert unique.tolist() == [0, 1, 2, 3, 4]
    assert first.tolist() == [1, 4, 2, 6, 0]
    assert torch.equal(unique[inverse], index)


def test_image_batches_keep_an_image_together():
    ids = ["a", "a", "b", "c", "c", "c", "a", "d", "e", "e", "e", "e", "e"]
    batches, image_of_row = image_batches(ids, len(ids), 4)
    assert sorted(r for b in batches for r in b) == list(range(len(ids)))
    assert all(len(b) <= 4 for b in batches)
    assert image_of_row.tolist() == [0, 0, 1, 2, 2, 2, 0, 3, 4, 4, 4, 4, 4]
    # Every image lies in one batch, except "e" (5 rows > 4), split across two.
    spans = {k: {i for i, b in enumerate(batches) for r in b if ids[r] == k} for k in set(ids)}
    assert all(len(s) == 1 for k, s in spans.items() if k != "e") and len(spans["e"]) == 2
    assert batches[0] == [0, 1, 6, 2]  # "a" (rows 0, 1 and 6) then "b"
    # Without ids every row is its own image.
    batches, image_of_row = image_batches(None, 5, 2)
    assert batches == [[0, 1], [2, 3], [4]] and image_of_row.tolist() == list(range(5))


# ----------------------------------------------------------------- evaluate on a real split


@pytest.fixture(scope="module")
def ckpt(tiny_data, tiny_sets, tmp_path_factory):
    """A random tiny checkpoint for the tiny shapes data, saved by the real save path."""
    from vgdistill.models.checkpoint import save_checkpoint
    from vgdistill.models.factory import build_model
    from vgdistill.recipe import load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes/tiny.toml", tiny_sets(tiny_data, 'eval.splits=["train"]'))
    model = build_model(recipe, load_weights=False)
    folder = tmp_path_factory.mktemp("eval-ckpt") / "best"
    save_checkpoint(model, recipe, folder)
    return folder


def _visual_rows(model) -> list[int]:
    """Record the batch size of every visual-branch call of `model`."""
    calls: list[int] = []
    model.visual.register_forward_hook(lambda m, args, out: calls.append(int(args[0].shape[0])))
    return calls


def test_shared_visual_pass_gives_the_per_row_results(ckpt, tiny_data):
    from vgdistill.evaluation.evaluate import evaluate
    from vgdistill.models.checkpoint import load_checkpoint

    model, recipe = load_checkpoint(ckpt)
    calls = _visual_rows(model)
    shared = evaluate(model, recipe, ["train"], batch_size=8)["train"]
    images = shared["images"]
    assert sum(calls) == images < shared["count"]  # one visual pass per image per batch
    calls.clear()
    per_row = evaluate(model, recipe, ["train"], batch_size=8, shared_visual=False)["train"]
    assert sum(calls) == per_row["count"] == shared["count"]
    assert per_row["acc50"] == shared["acc50"] and per_row["acc75"] == shared["acc75"]
    assert per_row["miou"] == pytest.approx(shared["miou"], abs=1e-6)
    assert shared["expressions_per_s"] > 0 and shared["images_per_s"] > 0
    # Row by row, the same IoUs.
    from vgdistill.data.manifest import load_split
    from vgdistill.device import make_accelerator
    from vgdistill.evaluation.evaluate import SplitLoader, _row_ious
    from vgdistill.models.factory import build_tokenizer

    acc = make_accelerator()
    split = SplitLoader(
        load_split(tiny_data, "train"), build_tokenizer(recipe.model), recipe, 8, acc
    )
    rows_a, iou_a = _row_ious(model, split, acc, recipe.data.image_size, "transvg", True)
    rows_b, iou_b = _row_ious(model, split, acc, recipe.data.image_size, "transvg", False)
    assert torch.equal(rows_a, rows_b) and sorted(rows_a.tolist()) == list(range(51))
    assert torch.allclose(iou_a, iou_b, atol=1e-5)


def test_evaluate_matches_the_reference_formulas_row_by_row(ckpt, tiny_data):
    """evaluate()'s transvg mIoU equals the reference formulas on the model's own boxes."""
    from vgdistill.data.loader import build_loader
    from vgdistill.data.manifest import load_split
    from vgdistill.evaluation.evaluate import evaluate
    from vgdistill.models.checkpoint import load_checkpoint
    from vgdistill.models.factory import build_tokenizer

    model, recipe = load_checkpoint(ckpt)
    split = load_split(tiny_data, "train")
    loader = build_loader(split, build_tokenizer(recipe.model), recipe.data, 64, False, 0)
    size = recipe.data.image_size
    ious, pixel = [], []
    with torch.no_grad():
        for batch in loader:
            pred = model(
                batch["image"], batch["image_mask"], batch["input_ids"], batch["attention_mask"]
            ).pred_boxes
            for i, row in enumerate(batch["index"].tolist()):
                x1, y1, x2, y2 = split[row]["bbox"]
                w, h = (int(v) for v in batch["orig_size"][i])
                target = reference_target([x1, y1, x2 - x1, y2 - y1], False, w, h, size)
                ious.append(reference_iou(pred[i], target))
                pixel.append(pixel_iou(pred[i], [x1, y1, x2, y2], w, h, size))
    for protocol, expected in (("transvg", ious), ("pixels", pixel)):
        recipe.eval.protocol = protocol
        res = evaluate(model, recipe, ["train"], batch_size=8)["train"]
        assert res["miou"] == pytest.approx(float(np.mean(expected)), abs=1e-5)
        assert res["acc50"] == pytest.approx(float(np.mean(np.array(expected) >= 0.5)))


def test_eval_cli_names_the_protocol_and_takes_set(ckpt, tiny_data, tmp_path):
    out = tmp_path / "e.json"
    args = ["eval", str(ckpt), "--json", str(out), "--batch-size", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["protocol"] == "transvg" and record["results"]["train"]["count"] == 51
    assert "transvg protocol" in " ".join(result.stdout.split())
    result = runner.invoke(
        app, [*args, "--set", "eval.protocol=pixels", "--set", 'eval.splits=["val"]']
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["protocol"] == "pixels" and list(record["results"]) == ["val"]
    assert "pixels protocol" in " ".join(result.stdout.split())
    printed = runner.invoke(app, ["eval", str(ckpt), "--json", "-", "--batch-size", "8"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["results"]["train"]["count"] == 51  # JSON only
    for bad, says in (
        ("eval.protocol=paper", "not one of: transvg, pixels"),
        ("model.hidden_dim=16", "fixed by the checkpoint"),
        ("data.image_size=32", "fixed by the checkpoint"),
        ("eval.protcol=pixels", "eval.protocol"),
    ):
        result = runner.invoke(app, ["eval", str(ckpt), "--set", bad])
        assert result.exit_code == 2, (bad, result.output)
        assert says in result.stderr, (bad, result.stderr)


def test_eval_and_predict_refuse_non_finite_predictions(ckpt, tmp_path):
    from vgdistill.models.checkpoint import load_checkpoint, save_checkpoint

    # A diverged model saved by the real save path (a valid file holding NaN weights).
    model, recipe = load_checkpoint(ckpt)
    with torch.no_grad():
        for p in model.bbox_embed.parameters():
            p.fill_(float("nan"))
    broken = tmp_path / "nan-ckpt"
    save_checkpoint(model, recipe, broken)

    result = runner.invoke(app, ["eval", str(broken)])
    assert result.exit_code == 2, result.output
    assert "non-finite" in result.stderr and str(broken) in result.stderr.replace("\n", "")
    image = tmp_path / "i.png"
    Image.new("RGB", (40, 30), (90, 20, 20)).save(image)
    result = runner.invoke(app, ["predict", str(broken), str(image), "a box"])
    assert result.exit_code == 2, result.output
    assert "non-finite" in result.stderr and str(broken) in result.stderr.replace("\n", "")


def test_shuffle_control_is_a_seeded_derangement():
    datasets = pytest.importorskip("datasets")
    phrases = [f"phrase {i}" for i in range(12)]
    ds = datasets.Dataset.from_dict({"expression": phrases, "id": list(range(12))})
    a = shuffle_phrases(ds, seed=13)
    assert sorted(a["expression"]) == sorted(phrases)
    assert all(x != y for x, y in zip(a["expression"], phrases, strict=True))
    assert list(a["id"]) == list(range(12))
    assert list(shuffle_phrases(ds, seed=13)["expression"]) == list(a["expression"])
    assert list(shuffle_phrases(ds, seed=14)["expression"]) != list(a["expression"])


def test_results_table_shows_control_columns():
    from rich.console import Console

    m = {"acc50": 0.5, "acc75": 0.25, "miou": 0.4, "count": 8, "expressions_per_s": 10.0}
    table = results_table({"val": {**m, "shuffle": {**m, "acc50": 0.125}}})
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "Acc@0.5 shuffled" in text and "12.50" in text and "50.00" in text


# ----------------------------------------------------------------- two processes

DRIVER = """
import sys
from vgdistill.cli.app import app
sys.exit(app(sys.argv[1:], prog_name="vgdistill", standalone_mode=False) or 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", ["3", "8"])
def test_eval_counts_are_exact_under_two_processes(ckpt, tmp_path, batch_size):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["eval", str(ckpt), "--batch-size", batch_size, "--set", 'eval.splits=["train","val"]']
    assert runner.invoke(app, [*args, "--json", str(one)]).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29000 + os.getpid() % 500),
        "--no-python",
        sys.executable,
        "-c",
        DRIVER,
        *args,
        "--json",
        str(two),
    ]
    done = subprocess.run(launcher, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["processes"] == 2 and a["processes"] == 1
    for split, rows in (("train", 51), ("val", 3)):
        assert a["results"][split]["count"] == b["results"][split]["count"] == rows
        assert a["results"][split]["acc50"] == b["results"][split]["acc50"]
        assert a["results"][split]["miou"] == pytest.approx(b["results"][split]["miou"], abs=1e-6)
