"""Packaging: the wheel carries the package and every shipped recipe, and a wheel installed into
a fresh virtual environment runs `recipe list`, `recipe cp` and the demo's first stage from a
folder outside the checkout.

Offline: the wheel is built with the test's own setuptools (no build isolation), and the fresh
environment sees the test environment's dependencies through a path file, so pip installs the
wheel alone (`--no-deps --no-index`).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vgdistill.recipe.shipped import recipes_dir, shipped_recipes

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "vgdistill", "recipes")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout's sources (the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    _run([*pip_wheel, "--no-index", "-w", str(dist), str(src)], cwd=tmp)
    (built,) = dist.glob("vgdistill-*.whl")
    return built


def test_wheel_holds_the_package_and_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {
        "vgdistill/recipes/" + r.path.relative_to(recipes_dir()).as_posix()
        for r in shipped_recipes().values()
    }
    assert "vgdistill/recipes/refcoco/r50.toml" in recipes
    assert recipes <= names, recipes - names
    # Every module of the checkout: a package setup.py's list missed would be absent.
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vgdistill").rglob("*.py")}
    assert modules <= names, modules - names
    assert any(n.startswith("vgdistill/models/clip_configs/") for n in names)


def _fresh_env(tmp_path: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    """A new virtual environment holding only the wheel (dependencies via a path file)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    _run([*pip, "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return python.parent, env


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    bin_dir, env = _fresh_env(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = "import vgdistill; print(vgdistill.__file__)"
    where = _run([str(bin_dir / "python"), "-c", code], work, env)
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")

    vgd = str(bin_dir / "vgdistill")
    listed = _run([vgd, "recipe", "list"], work, env)
    assert "refcoco/r50" in listed and "demo" in listed
    _run([vgd, "recipe", "cp", "refcocog-umd/swin_s", "mine.toml"], work, env)
    assert "max_query_len = 40" in _run([vgd, "recipe", "show", "mine.toml"], work, env)

    # The demo finds its shipped recipe and runs its first stage in this folder.
    argv = ["demo", "--out", "runs/demo", "--rows", "40", "--stop-after", "prepare"]
    _run([vgd, *argv, "--no-progress"], work, env)
    summary = json.loads((work / "runs/demo/summary.json").read_text())
    assert summary["stopped_after"] == "prepare"
    assert summary["reused"] == {"prepare shapes": False}
    assert (work / "runs/demo/data/prepare.json").is_file()
