"""Recipes: every shipped file validates; bad keys, types and values give one-line errors."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vgdistill.cli.app import app
from vgdistill.errors import VGError
from vgdistill.recipe import load_recipe, to_toml

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))
runner = CliRunner()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.train.lr > 0
    # The resolved recipe survives a TOML round trip unchanged.
    again = path.parent / f".roundtrip-{path.name}"
    try:
        again.write_text(to_toml(recipe))
        assert load_recipe(again) == recipe
    finally:
        again.unlink()


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
