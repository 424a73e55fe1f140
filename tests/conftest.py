"""Test-wide settings and shared session fixtures.

Settings: never reach a model hub; keep torch to one CPU thread.
Fixtures built once per session and shared by every test file:
- `tiny_data`: `vgdistill prepare shapes --rows 60 --image-size 64` (the real command);
- `tiny_teacher`: a random `vgd-tiny-clip` CLIP teacher folder, written by the real saver;
- `tiny_sets`: the `--set` overrides of a tiny, distillation-free run of recipes/tiny.toml.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run as fast on one thread, and spare threads spin on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny.toml"


def tiny_overrides(data: Path, *extra: str) -> list[str]:
    """--set values for a tiny, distillation-free run of recipes/tiny.toml on `data`."""
    return [
        f'data.path="{data}"',
        'distill.modality="none"',
        "train.max_steps=2",
        "train.batch_size=4",
        "train.warmup_steps=0",
        "train.log_every=1",
        'eval.splits=["val"]',
        "eval.batch_size=4",
        "data.num_workers=0",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_sets():
    """`tiny_overrides(data, *extra)`: the overrides of a tiny run, for any test to extend."""
    return tiny_overrides


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared shapes dataset of 60 rows of 64x64 images, made by the CLI."""
    from typer.testing import CliRunner

    from vgdistill.cli.app import app

    out = tmp_path_factory.mktemp("tiny-data") / "shapes"
    args = ["prepare", "shapes", "--rows", "60", "--image-size", "64", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A random vgd-tiny-clip teacher folder (what `distill.teacher` names), seed 0."""
    import torch

    from vgdistill.models.teacher import Teacher
    from vgdistill.recipe import DistillConfig

    torch.manual_seed(0)
    cfg = DistillConfig(teacher="vgd-tiny-clip", teacher_pretrained="")
    folder = tmp_path_factory.mktemp("tiny-teacher") / "teacher"
    Teacher.from_config(cfg, load_weights=False).save(folder)
    return folder
