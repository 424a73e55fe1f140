"""The public Python API: `from vgdistill import Grounder`, and the README's example, run."""

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder holding a tiny random checkpoint in best/ (what training leaves)."""
    from vgdistill.models.checkpoint import save_checkpoint
    from vgdistill.models.factory import build_model
    from vgdistill.recipe import load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes/tiny.toml", ["distill.modality=none"])
    run = tmp_path_factory.mktemp("api") / "run"
    save_checkpoint(build_model(recipe, load_weights=False), recipe, run / "best")
    return run


def test_the_readme_example_runs(run_folder, tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    shutil.copytree(run_folder, tmp_path / "runs" / "demo" / "student")
    arr = np.random.default_rng(0).integers(0, 255, size=(60, 100, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__readme__"})
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["the red circle", "the small square"]
    for line in lines:
        x1, y1, x2, y2 = (int(v) for v in re.findall(r"-?\d+", line.split(":")[1]))
        assert 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 60


def test_grounder_is_the_package_top_and_loads_lazily():
    code = (
        "import sys, vgdistill\n"
        "assert 'torch' not in sys.modules, 'import vgdistill loaded torch'\n"
        "from vgdistill import Grounder\n"
        "from vgdistill.tools.grounder import Grounder as G\n"
        "assert Grounder is G and 'Grounder' in vgdistill.__all__\n"
        "try:\n"
        "    vgdistill.NoSuchThing\n"
        "except AttributeError as e:\n"
        "    assert 'NoSuchThing' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_from_pretrained_takes_a_run_or_a_checkpoint(run_folder):
    from vgdistill import Grounder
    from vgdistill.errors import VGError

    image = Image.new("RGB", (50, 30), (200, 40, 40))
    by_run = Grounder.from_pretrained(run_folder, device="cpu")
    by_ckpt = Grounder.from_pretrained(str(run_folder / "best"), device="cpu")
    assert by_run.checkpoint == by_ckpt.checkpoint == run_folder / "best"
    (a,), (b,) = by_run.predict(image, "the red one"), by_ckpt.predict(image, ["the red one"])
    assert a == pytest.approx(b) and all(isinstance(v, float) for v in a)
    (g,) = by_run.ground(image, ["the red one"], attention=True)
    assert g.box == pytest.approx(a) and g.heat is not None and g.heat.shape == (30, 50)
    with pytest.raises(VGError, match="checkpoint not found"):
        Grounder.from_pretrained(run_folder / "nope")
    with pytest.raises(VGError, match="empty"):
        by_run.predict(image, ["\u200b"])
