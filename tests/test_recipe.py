"""Recipes: every shipped file validates; shipped names, `recipe list` / `cp`; the paper
recipes' per-dataset settings and their DETR start check; bad keys, types and values give
one-line errors."""

import logging
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.errors import VGError
from vgdistill.recipe import load_recipe, to_toml
from vgdistill.recipe.checks import check_start_files
from vgdistill.recipe.shipped import recipes_dir, run_name, shipped_recipes

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))
SHIPPED = shipped_recipes()
runner = CliRunner()


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_recipe_validates(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe == load_recipe(SHIPPED[name].path)
    assert recipe.train.lr > 0
    assert SHIPPED[name].description, "the first comment line describes the recipe"
    # The resolved recipe survives a TOML round trip unchanged.
    again = tmp_path / "roundtrip.toml"
    again.write_text(to_toml(recipe))
    assert load_recipe(again) == recipe


def test_paper_hyper_parameters_in_r50():
    r = load_recipe(RECIPES[0].parent / "r50.toml")
    assert (r.distill.alpha, r.distill.beta, r.distill.position) == (1.5, 2.0, "fusion")
    assert (r.train.lr, r.train.lr_backbone, r.train.lr_text) == (1e-4, 1e-5, 1e-5)
    assert (r.data.image_size, r.data.max_query_len, r.train.seed) == (640, 20, 13)
    assert r.model.backbone == "resnet50" and r.model.enc_layers == 6


def test_extends_and_preset(tmp_path):
    swin = load_recipe(RECIPES[0].parent / "swin_s.toml")
    assert swin.model.backbone == "swin_s"
    assert swin.distill.alpha == 1.5  # inherited from r50.toml


def test_misspelled_key_names_key_and_suggestion(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlrr = 0.1\n")
    result = runner.invoke(app, ["recipe", "check", str(bad)])
    assert result.exit_code == 2
    err = result.stderr if hasattr(result, "stderr") else result.output
    assert "train.lrr" in err and "did you mean train.lr" in err
    assert "Traceback" not in result.output
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[train]\nlr = 'fast'\n", "train.lr must be float, got str"),
        ("[train]\nlr = -1.0\n", "train.lr must be >= 0"),
        ("[distill]\nalpha = -0.5\n", "distill.alpha must be >= 0"),
        ("[distill]\nloss = 'hinge'\n", "cosine, l1, mse"),
        ("[trian]\nlr = 1.0\n", "did you mean train"),
        ("[model]\npreset = 'r18'\n", "valid presets"),
        ("[data]\naugment_ops = ['flip', 'rotate']\n", "'rotate'; choose from: resize, crop"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_recipes(tmp_path, text, needle):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(VGError, match=None) as info:
        load_recipe(bad)
    assert needle in str(info.value)
    assert str(bad) in str(info.value)


def test_circular_extends(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(VGError, match="circular"):
        load_recipe(tmp_path / "a.toml")


def test_set_overrides_are_toml_and_validated():
    r = load_recipe(
        RECIPES[0].parent / "tiny.toml",
        ["train.lr=3e-4", "model.backbone=resnet50", "eval.splits=['val']"],
    )
    assert r.train.lr == 3e-4 and r.model.backbone == "resnet50" and r.eval.splits == ["val"]
    with pytest.raises(VGError, match="did you mean train.epochs"):
        load_recipe(RECIPES[0].parent / "tiny.toml", ["train.epoch=3"])
    with pytest.raises(VGError, match="must be int"):
        load_recipe(RECIPES[0].parent / "tiny.toml", ["train.epochs=three"])


def test_recipe_show_prints_resolved(tmp_path):
    result = runner.invoke(
        app, ["recipe", "show", str(RECIPES[0].parent / "tiny.toml"), "--set", "train.lr=0.5"]
    )
    assert result.exit_code == 0
    assert "lr = 0.5" in result.output and 'backbone = "tiny_cnn"' in result.output


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["recipe", "check", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "recipe not found" in result.output


# dataset -> (max_query_len, epochs, lr_drop, DETR file, eval splits): TransVG's train scripts.
PAPER = {
    "refcoco": (20, 90, 60, "detr-r50-unc.pth", ["val", "testA", "testB"]),
    "refcoco+": (20, 180, 120, "detr-r50-unc.pth", ["val", "testA", "testB"]),
    "refcocog-umd": (40, 90, 60, "detr-r50-gref.pth", ["val", "test"]),
    "refcocog-google": (40, 90, 60, "detr-r50-gref.pth", ["val"]),
    "referit": (20, 90, 60, "detr-r50-referit.pth", ["val", "test"]),
    "flickr30k": (20, 90, 60, "detr-r50.pth", ["val", "test"]),
}


@pytest.mark.parametrize("dataset", list(PAPER))
def test_paper_recipes_per_dataset(dataset):
    tokens, epochs, drop, detr, splits = PAPER[dataset]
    r50 = load_recipe(f"{dataset}/r50")
    assert (r50.data.max_query_len, r50.train.epochs, r50.train.lr_drop) == (tokens, epochs, drop)
    assert r50.model.detr_checkpoint == f"checkpoints/{detr}" and r50.model.detr_source
    assert r50.eval.splits == splits and r50.data.path == f"data/{dataset}"
    assert (r50.model.backbone, r50.distill.alpha, r50.distill.beta) == ("resnet50", 1.5, 2.0)
    assert (r50.train.batch_size, r50.train.lr, r50.train.lr_text) == (8, 1e-4, 1e-5)
    # Swin-S: the same dataset settings; no DETR start fits its backbone.
    swin = load_recipe(f"{dataset}/swin_s")
    assert swin.model.backbone == "swin_s" and swin.model.detr_checkpoint == ""
    assert (swin.data, swin.train, swin.eval, swin.distill) == (
        r50.data,
        r50.train,
        r50.eval,
        r50.distill,
    )


def test_every_extends_names_a_shipped_recipe():
    """So a copy (`recipe cp`) still resolves its base wherever it is put."""
    for recipe in SHIPPED.values():
        found = re.search(r'^extends = "([^"]+)"', recipe.path.read_text(), re.MULTILINE)
        if found:
            assert found.group(1) in SHIPPED, f"{recipe.name}: extends {found.group(1)}"


def test_names_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("tiny") == load_recipe(recipes_dir() / "tiny.toml")
    assert load_recipe("refcoco/r50.toml") == load_recipe("refcoco/r50")
    # A file that exists wins over a shipped name.
    Path("tiny.toml").write_text('extends = "tiny"\n[train]\nlr = 0.5\n')
    assert load_recipe("tiny.toml").train.lr == 0.5 and load_recipe("tiny").train.lr == 1e-3
    with pytest.raises(VGError, match=r"not a file, nor a shipped recipe name; did you mean "):
        load_recipe("refcoco/r5")
    assert (run_name("refcoco+/r50"), run_name("tiny.toml"), run_name("x/my.toml")) == (
        "refcoco+-r50",
        "tiny",
        "my",
    )
    # extends names a shipped recipe or a file beside the recipe; a missing one is named.
    Path("bad.toml").write_text('extends = "nope"\n')
    with pytest.raises(VGError, match=r"bad.toml: extends 'nope': recipe not found"):
        load_recipe("bad.toml")


def test_recipe_list_shows_every_shipped_recipe():
    result = runner.invoke(app, ["recipe", "list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for name, recipe in SHIPPED.items():
        assert re.search(rf"\b{re.escape(name)}\s.*{re.escape(recipe.description)}", result.output)


def test_recipe_cp(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    result = runner.invoke(app, ["recipe", "cp", "refcoco+/swin_s", str(folder)])
    assert result.exit_code == 0, result.output
    copy = folder / "refcoco+-swin_s.toml"
    assert copy.read_text() == SHIPPED["refcoco+/swin_s"].path.read_text()
    assert load_recipe(copy) == load_recipe("refcoco+/swin_s")
    # An existing file is kept unless --force; a file name of one's own works too.
    copy.write_text("# mine\n")
    again = runner.invoke(app, ["recipe", "cp", "refcoco+/swin_s", str(copy)])
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    assert copy.read_text() == "# mine\n"
    forced = runner.invoke(app, ["recipe", "cp", "tiny", str(copy), "--force"])
    assert forced.exit_code == 0 and load_recipe(copy) == load_recipe("tiny")
    unknown = runner.invoke(app, ["recipe", "cp", "refcocoo/r50", str(tmp_path / "x.toml")])
    assert unknown.exit_code == 2 and "did you mean refcoco/r50" in unknown.output
    assert not (tmp_path / "x.toml").exists()


def test_recipe_cp_refuses_an_unwritable_dest(tmp_path):
    """DEST below a file, or in a read-only folder: exit 2 with one line, nothing written."""
    from test_faults_fs import _chmod_protects

    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    cases = {afile / "r50.toml": f"{afile} is a file, not a folder"}
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if _chmod_protects(tmp_path):  # not for root, which writes into chmod a-w folders anyway
        cases[locked / "r50.toml"] = f"{locked} is not writable (permission denied)"
    try:
        for dest, reason in cases.items():
            result = runner.invoke(app, ["recipe", "cp", "refcoco/r50", str(dest)])
            assert result.exit_code == 2, result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
            assert f"DEST {dest}: {reason}" in result.output and not dest.exists()
    finally:
        locked.chmod(0o755)
    assert afile.read_text() == "mine"


def test_paper_recipe_without_its_detr_file_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "refcoco"
    result = runner.invoke(app, ["train", "refcoco/r50", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "model.detr_checkpoint: checkpoints/detr-r50-unc.pth not found" in message
    assert "drive.google.com/drive/folders/" in message and "djiajunustc/TransVG" in message
    assert "--set model.detr_checkpoint=PATH" in message
    assert '--set model.detr_checkpoint=""' in message
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "runs").exists()  # nothing written


def test_detr_opt_out_warns_and_a_present_file_passes(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vgdistill"):
        check_start_files(load_recipe("refcoco/r50", ['model.detr_checkpoint=""']))
    assert "not from the DETR start this recipe's results assume" in caplog.text
    Path("checkpoints").mkdir()
    Path("checkpoints/detr-r50-gref.pth").write_bytes(b"")
    check_start_files(load_recipe("refcocog-umd/r50"))
    # A recipe naming no published source points at `vgdistill detector`.
    with pytest.raises(VGError, match="write one with `vgdistill detector RECIPE`"):
        check_start_files(load_recipe("tiny", ["model.detr_checkpoint='x/detr.safetensors'"]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vgdistill"):
        check_start_files(load_recipe("refcoco/swin_s"))  # no DETR start fits: no warning
    assert caplog.text == ""
