"""Fine-tuning: `model.init_from` / `train --init-from` starts a run from a checkpoint made by
`vgdistill import transvg`, and `--resume` continues a finished run for more epochs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.toml"
runner = CliRunner()


def _sets(items: list[str]) -> list[str]:
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A TransVG reference checkpoint (tiny sizes) converted by `vgdistill import transvg`."""
    from test_import_transvg import RefTransVG, transvg_args

    torch.manual_seed(0)
    ref = RefTransVG().eval()
    root = tmp_path_factory.mktemp("transvg")
    ckpt = root / "best_checkpoint.pth"
    torch.save({"model": ref.transvg_state_dict(), "args": transvg_args()}, ckpt)
    out = root / "imported"
    # Imported without a teacher: the checkpoint then holds no distillation projections.
    args = ["import", "transvg", str(ckpt), "--out", str(out), "--set", "distill.modality=none"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def finetune_sets(data: Path, teacher: Path, *extra: str) -> list[str]:
    """A distilling run of recipes/tiny.toml with the imported checkpoint's architecture."""
    from test_import_transvg import BERT_ENC_NUM, ENC, FFN, FUSION, HEADS, HID, IMSIZE, QLEN

    return [
        f'data.path="{data}"',
        f"data.image_size={IMSIZE}",
        f"data.max_query_len={QLEN}",
        "model.preset=transvg_r50",  # TransVG as published, at the test's sizes below
        f"model.hidden_dim={HID}",
        f"model.enc_layers={ENC}",
        f"model.enc_heads={HEADS}",
        f"model.enc_ffn={FFN}",
        f"model.fusion_layers={FUSION}",
        f"model.fusion_heads={HEADS}",
        f"model.fusion_ffn={FFN}",
        f"model.text_layer={BERT_ENC_NUM}",
        f'distill.teacher="{teacher}"',
        "train.max_steps=2",
        "train.batch_size=4",
        "train.warmup_steps=0",
        "train.log_every=1",
        'eval.splits=["val"]',
        "eval.batch_size=4",
        "data.num_workers=0",
        *extra,
    ]


def test_init_from_import_gives_its_boxes_then_trains(
    imported, tiny_data, tiny_teacher, tmp_path, caplog
):
    from test_import_transvg import inputs

    from vgdistill.models.checkpoint import load_checkpoint
    from vgdistill.recipe import load_recipe
    from vgdistill.training.student import Trainer

    sets = finetune_sets(tiny_data, tiny_teacher)
    # Before any step: the student built for the run predicts the import's boxes.
    r = load_recipe(RECIPE, [*sets, f'model.init_from="{imported}"'])
    trainer = Trainer(r, tmp_path / "probe", show_progress=False)
    trainer.acc = trainer._make_accelerator()
    with caplog.at_level(logging.INFO, logger="vgdistill"):
        trainer._build()
    reference, _ = load_checkpoint(imported)
    student = trainer.student.eval()
    img, img_mask, ids, word_mask = inputs()
    with torch.no_grad():
        want = reference(img, img_mask, ids, word_mask).pred_boxes
        got = student(img, img_mask, ids, word_mask).pred_boxes
    assert want.std() > 1e-3  # the two samples get different boxes: a real comparison
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    # Every tensor of the import was loaded; only the distillation projections are new.
    n = len(load_file(imported / "model.safetensors"))
    line = re.search(r"init_from .*: (\d+) tensors loaded, (\d+) missing \(([^)]*)\)", caplog.text)
    assert line, caplog.text
    assert int(line.group(1)) == n and int(line.group(2)) == 4
    assert all(k.startswith("distill_") for k in line.group(3).split(", ") if k != "...")
    assert "0 unexpected" in caplog.text and "start untrained" not in caplog.text

    # The same through the CLI: the run trains on from the imported weights.
    out = tmp_path / "run"
    args = ["train", str(RECIPE), "--out", str(out), "--init-from", str(imported)]
    result = runner.invoke(app, [*args, "--no-progress", *_sets(sets)])
    assert result.exit_code == 0, result.output
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["loss_distill_img"] > 0 for s in steps)
    start = load_file(imported / "model.safetensors")
    trained = load_file(out / "last" / "model.safetensors")
    head = "bbox_embed.layers.2.weight"
    assert not torch.equal(start[head], trained[head])
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    assert f'init_from = "{imported}"' in (out / "recipe.toml").read_text()


def test_init_from_missing_or_not_a_checkpoint_is_a_clear_error(
    imported, tiny_data, tiny_sets, tmp_path
):
    from vgdistill.errors import VGError
    from vgdistill.training.init_from import load_matching

    base = ["train", str(RECIPE), "--no-progress", *_sets(tiny_sets(tiny_data))]
    result = runner.invoke(
        app, [*base, "--out", str(tmp_path / "a"), "--init-from", str(tmp_path / "none")]
    )
    assert result.exit_code == 2
    assert "model.init_from" in result.output and "not found" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--init-from", str(empty)])
    assert result.exit_code == 2 and "is not a checkpoint" in result.output
    # A checkpoint of which no tensor fits: an error, not a silently untrained start.
    with pytest.raises(VGError, match="no tensor of .* fits this model"):
        load_matching(torch.nn.Linear(3, 2), imported)


def test_init_from_counts_tensors_of_another_shape(imported, tiny_data, tiny_teacher, caplog):
    from vgdistill.models.checkpoint import WEIGHTS
    from vgdistill.recipe import load_recipe
    from vgdistill.training.init_from import init_model

    # A longer query than the import was trained with: the fusion positions do not fit.
    sets = finetune_sets(tiny_data, tiny_teacher, "data.max_query_len=10")
    r = load_recipe(RECIPE, [*sets, f'model.init_from="{imported}"'])
    model, report = init_model(r)
    assert [k.split()[0] for k in report.mismatched] == ["vl_pos_embed.weight"]
    assert len(report.loaded) == len(load_file(imported / WEIGHTS)) - 1
    with caplog.at_level(logging.INFO, logger="vgdistill"):
        report.log()
    assert "1 of another shape (vl_pos_embed.weight" in caplog.text
    assert "1 tensor(s) of the model start untrained" in caplog.text


def _run(data: Path, tiny_sets, out: Path, epochs: int, resume: bool = False):
    args = ["train", str(RECIPE), "--out", str(out), "--no-progress"]
    sets = tiny_sets(data, "train.max_steps=0", f"train.epochs={epochs}", "train.batch_size=16")
    sets += ['train.scheduler="step"', "train.lr_drop=2", "train.save_every=0"]
    return runner.invoke(app, [*args, *(["--resume"] if resume else []), *_sets(sets)])


def test_a_finished_run_continues_for_more_epochs(tiny_data, tiny_sets, tmp_path):
    whole, cont = tmp_path / "whole", tmp_path / "continued"
    assert _run(tiny_data, tiny_sets, whole, epochs=3).exit_code == 0
    assert _run(tiny_data, tiny_sets, cont, epochs=2).exit_code == 0
    done = (cont / "train_summary.json").read_text()
    assert '"step": 8' in done  # 51 rows at batch 16: 4 steps per epoch

    # The same epochs: nothing to do. Fewer: refused, the run is kept as it is.
    again = _run(tiny_data, tiny_sets, cont, epochs=2, resume=True)
    assert again.exit_code == 0 and (cont / "train_summary.json").read_text() == done
    fewer = _run(tiny_data, tiny_sets, cont, epochs=1, resume=True)
    assert fewer.exit_code == 2 and "already trained 8 steps" in fewer.output
    assert "epochs = 2" in (cont / "recipe.toml").read_text()

    # More: it trains on to exactly the weights of the run that had 3 epochs from the start
    # (the step schedule, lr drop at epoch 2, is the same for both lengths).
    more = _run(tiny_data, tiny_sets, cont, epochs=3, resume=True)
    assert more.exit_code == 0, more.output
    a = load_file(whole / "last" / "model.safetensors")
    b = load_file(cont / "last" / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    records = read_metrics(cont / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["type"] == "eval"] == [4, 8, 12]
    assert '"step": 12' in (cont / "train_summary.json").read_text()
    assert "epochs = 3" in (cont / "recipe.toml").read_text()
