"""The end-to-end demo: prepare shapes -> pretrain the visual branch as a detector -> fit a
CLIP teacher -> train the student with distillation -> evaluate (with the shuffled-phrase
control) -> ground phrases on test images.

Every stage reuses what an earlier run of the demo finished, so a re-run is quick and a
cut-off run continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from vgdistill.atomic import write_text
from vgdistill.errors import VGError
from vgdistill.recipe import Recipe, load_recipe
from vgdistill.training.rundir import RunDir, discard

if TYPE_CHECKING:
    from vgdistill.data.prepare import PrepareResult

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.toml"
PREDICT_IMAGES = 4  # test images drawn with their predicted boxes
# The demo's shapes data: the benchmark's own val/test splits, but four times its default
# train split. Generating images is cheap and the student generalises with the images it sees.
DEMO_TRAIN_ROWS = 32_000


@dataclass
class DemoReport:
    """What the demo did, for the closing summary and summary.json."""

    out: Path
    stages: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    pictures: list[str] = field(default_factory=list)

    @property
    def student(self) -> Path:
        """The student's run folder."""
        return self.out / "student"


@contextmanager
def _stage(report: DemoReport, name: str, console: Console) -> Iterator[None]:
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    yield
    report.stages[name] = time.perf_counter() - start


def demo_recipe(out: Path, recipe_path: Path, overrides: list[str]) -> Recipe:
    """The demo recipe with its data, detector and teacher placed under `out`.

    The detector stage runs when the recipe starts from `vgdistill detector` weights (its
    model.detr_checkpoint names a detr.safetensors); those weights then come from out/detector.
    """
    from vgdistill.training.detector import WEIGHTS_FILE

    placed = [f"data.path='{out / 'data'}'", f"distill.teacher='{out / 'teacher'}'"]
    recipe = load_recipe(recipe_path, placed + overrides)
    if Path(recipe.model.detr_checkpoint).name == WEIGHTS_FILE:
        recipe.model.detr_checkpoint = str(out / "detector" / WEIGHTS_FILE)
    return recipe


def run_demo(
    out: Path,
    recipe_path: Path = DEMO_RECIPE,
    overrides: list[str] | None = None,
    console: Console | None = None,
    progress: bool = True,
    rows: int | None = None,
    force: bool = False,
) -> DemoReport:
    """Run (or resume) the whole demo chain under `out`; returns what each stage did.

    `rows` sizes the shapes data over all splits (None = DEMO_TRAIN_ROWS train rows plus the
    generator's default val and test splits). `force` redoes every stage, replacing what an
    earlier demo left under `out` (after an upgrade that changed the demo's settings).
    """
    from vgdistill.evaluation.evaluate import evaluate_checkpoint
    from vgdistill.report.tables import prepare_table, results_table
    from vgdistill.training.detector import WEIGHTS_FILE, fit_detector
    from vgdistill.training.teacher import fit_teacher

    console = console or Console(stderr=True)
    out = Path(out)
    recipe = demo_recipe(out, Path(recipe_path), overrides or [])
    report = DemoReport(out=out)

    with _stage(report, "prepare shapes", console):
        prepared = _prepare_shapes(recipe, rows, force, console, progress)
        report.reused["prepare shapes"] = prepared.reused
        console.print(prepare_table(prepared.manifest))

    if Path(recipe.model.detr_checkpoint).name == WEIGHTS_FILE:
        with _stage(report, "pretrain detector", console):
            detector = fit_detector(
                recipe,
                Path(recipe.model.detr_checkpoint).parent,
                force=force,
                console=console,
                progress=progress,
            )
            report.reused["pretrain detector"] = detector["reused"]
            report.detector = detector["metrics"]

    if recipe.distill.modality != "none":
        with _stage(report, "fit teacher", console):
            fit = fit_teacher(
                recipe,
                recipe.distill.teacher,
                force=force,
                console=console,
                progress=progress,
            )
            report.reused["fit teacher"] = fit["reused"]
            report.teacher = fit["metrics"]["after"]

    run_dir = report.student
    with _stage(report, "train student", console):
        report.reused["train student"] = _train_student(recipe, run_dir, force, progress)

    with _stage(report, "evaluate", console):
        # The demo's own settings (eval.* may have changed since the student was saved);
        # the record goes to the student's eval.json, as `vgdistill eval` writes it.
        record = evaluate_checkpoint(
            run_dir,
            Path(recipe.data.path),
            recipe.eval.splits,
            control="shuffle",
            batch_size=recipe.eval.batch_size,
        )
        assert record is not None  # the demo runs in one process
        report.results = record["results"]
        console.print(results_table(report.results))

    with _stage(report, "predict", console):
        report.pictures = _predict_pictures(run_dir, recipe, out / "predict")
    write_text(out / "summary.json", json.dumps(_jsonable(report), indent=2) + "\n")
    return report


def _prepare_shapes(
    recipe: Recipe, rows: int | None, force: bool, console: Console, progress: bool
) -> PrepareResult:
    """Generate (or reuse) the demo's shapes data at recipe.data.path."""
    from vgdistill.data.prepare import prepare
    from vgdistill.data.shapes import DEFAULT_COUNTS
    from vgdistill.data.sources.base import SourceArgs

    split_rows = None if rows is not None else {**DEFAULT_COUNTS, "train": DEMO_TRAIN_ROWS}
    args = SourceArgs(
        seed=recipe.train.seed,
        image_size=recipe.data.image_size,
        train_mix=recipe.demo.shapes_train_mix,
        rows=rows,
        split_rows=split_rows,
    )
    return prepare(
        "shapes", args, recipe.data.path, force=force, console=console, progress=progress
    )


def _train_student(recipe: Recipe, run_dir: Path, force: bool, progress: bool) -> bool:
    """Train (or resume) the distilled student; True when an earlier run had finished it."""
    from vgdistill.training.student import RecipeMismatch, train

    if force and run_dir.exists():
        discard(run_dir)  # --force: the demo's own earlier student is replaced
    done = (RunDir(run_dir).read_summary() or {}).get("finished", False)
    try:
        train(recipe, run_dir, resume=True, show_progress=progress, command_hint="vgdistill demo")
    except RecipeMismatch as e:
        raise VGError(
            f"{run_dir} holds a student trained with other settings ({e.keys}); pass --force "
            "to train it again or choose another --out"
        ) from None
    return bool(done)


def _predict_pictures(run_dir: Path, recipe: Recipe, folder: Path) -> list[str]:
    """Ground each test image's phrase with `Predictor` and save the drawn PNGs."""
    from vgdistill.data.prepare import load_prepared
    from vgdistill.report.draw import colour_for, draw_boxes
    from vgdistill.tools.predict import Predictor

    predictor = Predictor(run_dir, device="cpu")
    split = recipe.eval.splits[-1]
    rows = load_prepared(recipe.data.path)[split].select(range(PREDICT_IMAGES))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(rows):
        image = row["image"].convert("RGB")
        (box,) = predictor.predict(image, [row["expression"]])
        # Enlarge the tiny synthetic image so the label is readable next to the box.
        scale = 6
        big = image.resize((image.width * scale, image.height * scale), resample=0)
        drawn = draw_boxes(
            big,
            [tuple(v * scale for v in row["bbox"]), tuple(v * scale for v in box)],
            ["ground truth", row["expression"]],
            colours=[(160, 160, 160), colour_for(0)],
        )
        path = folder / f"{split}-{i}.png"
        drawn.save(path)
        paths.append(str(path))
    return paths


def _jsonable(report: DemoReport) -> dict[str, Any]:
    return {
        "out": str(report.out),
        "stages_s": {k: round(v, 1) for k, v in report.stages.items()},
        "reused": report.reused,
        "detector_val": report.detector,
        "teacher_val_retrieval": report.teacher,
        "results": report.results,
        "pictures": report.pictures,
    }


def stage_lines(report: DemoReport, fmt: Callable[[float], str]) -> list[str]:
    """One line per stage: its wall time, and whether an earlier run's result was reused."""
    return [
        f"{name}: {fmt(sec)}" + (" (reused)" if report.reused.get(name) else "")
        for name, sec in report.stages.items()
    ]
