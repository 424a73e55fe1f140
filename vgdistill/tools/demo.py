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

DEMO_RECIPE = "demo"  # a shipped recipe name (`vgdistill recipe cp demo my.toml`)
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
    stopped_after: str | None = None

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


def demo_recipe(out: Path, recipe_path: str | Path, overrides: list[str]) -> Recipe:
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


# The demo's stages in order (`--stop-after` takes these names).
STAGES = ("prepare", "detector", "teacher", "train", "evaluate", "predict")


def run_demo(
    out: Path,
    recipe_path: str | Path = DEMO_RECIPE,
    overrides: list[str] | None = None,
    console: Console | None = None,
    progress: bool = True,
    rows: int | None = None,
    force: bool = False,
    stop_after: str | None = None,
) -> DemoReport:
    """Run (or resume) the whole demo chain under `out`; returns what each stage did.

    `recipe_path` is a file or a shipped recipe name. `rows` sizes the shapes data over all
    splits (None = DEMO_TRAIN_ROWS train rows plus the generator's default val and test
    splits). `force` redoes every stage, replacing what an earlier demo left under `out` (after
    an upgrade that changed the demo's settings). `stop_after` (one of STAGES) ends the chain
    after that stage; summary.json then records the stages that ran.
    """
    if stop_after is not None and stop_after not in STAGES:
        raise VGError(f"--stop-after {stop_after!r}: choose one of {', '.join(STAGES)}")
    console = console or Console(stderr=True)
    out = Path(out)
    recipe = demo_recipe(out, recipe_path, overrides or [])
    report = DemoReport(out=out)
    chain = _Chain(recipe, report, console, progress, force)
    stages = {
        "prepare": lambda: chain.prepare(rows),
        "detector": chain.detector,
        "teacher": chain.teacher,
        "train": chain.train,
        "evaluate": chain.evaluate,
        "predict": chain.predict,
    }
    for name in STAGES:
        stages[name]()
        if name == stop_after:
            report.stopped_after = name
            break
    write_text(out / "summary.json", json.dumps(_jsonable(report), indent=2) + "\n")
    return report


@dataclass
class _Chain:
    """The demo's stages over one recipe, each recording into the report."""

    recipe: Recipe
    report: DemoReport
    console: Console
    progress: bool
    force: bool

    def prepare(self, rows: int | None) -> None:
        """Generate (or reuse) the shapes data."""
        from vgdistill.report.tables import prepare_table

        with _stage(self.report, "prepare shapes", self.console):
            prepared = _prepare_shapes(self.recipe, rows, self.force, self.console, self.progress)
            self.report.reused["prepare shapes"] = prepared.reused
            self.console.print(prepare_table(prepared.manifest))

    def detector(self) -> None:
        """Pretrain the visual branch as a detector, when the recipe starts from one."""
        from vgdistill.training.detector import WEIGHTS_FILE, fit_detector

        weights = Path(self.recipe.model.detr_checkpoint)
        if weights.name != WEIGHTS_FILE:
            return
        with _stage(self.report, "pretrain detector", self.console):
            detector = fit_detector(
                self.recipe,
                weights.parent,
                force=self.force,
                console=self.console,
                progress=self.progress,
            )
            self.report.reused["pretrain detector"] = detector["reused"]
            self.report.detector = detector["metrics"]

    def teacher(self) -> None:
        """Fit the CLIP teacher, when the recipe distils."""
        from vgdistill.training.teacher import fit_teacher

        if self.recipe.distill.modality == "none":
            return
        with _stage(self.report, "fit teacher", self.console):
            fit = fit_teacher(
                self.recipe,
                self.recipe.distill.teacher,
                force=self.force,
                console=self.console,
                progress=self.progress,
            )
            self.report.reused["fit teacher"] = fit["reused"]
            self.report.teacher = fit["metrics"]["after"]

    def train(self) -> None:
        """Train (or resume) the student."""
        with _stage(self.report, "train student", self.console):
            self.report.reused["train student"] = _train_student(
                self.recipe, self.report.student, self.force, self.progress
            )

    def evaluate(self) -> None:
        """Evaluate the student with the shuffled-phrase control."""
        from vgdistill.evaluation.evaluate import evaluate_checkpoint
        from vgdistill.report.tables import results_table

        with _stage(self.report, "evaluate", self.console):
            # The demo's own settings (eval.* may have changed since the student was saved);
            # the record goes to the student's eval.json, as `vgdistill eval` writes it.
            record = evaluate_checkpoint(
                self.report.student,
                Path(self.recipe.data.path),
                self.recipe.eval.splits,
                control="shuffle",
                batch_size=self.recipe.eval.batch_size,
            )
            assert record is not None  # the demo runs in one process
            self.report.results = record["results"]
            self.console.print(results_table(self.report.results))

    def predict(self) -> None:
        """Ground test phrases and draw them."""
        with _stage(self.report, "predict", self.console):
            self.report.pictures = _predict_pictures(
                self.report.student, self.recipe, self.report.out / "predict"
            )


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
    """Ground each test image's phrase with `Grounder` and save the drawn PNGs."""
    from vgdistill.data.image_table import ImageTable
    from vgdistill.data.prepare import load_prepared
    from vgdistill.report.draw import colour_for, draw_boxes
    from vgdistill.tools.grounder import Grounder

    predictor = Grounder.from_pretrained(run_dir, device="cpu")
    split = recipe.eval.splits[-1]
    rows = load_prepared(recipe.data.path)[split].select(range(PREDICT_IMAGES))
    images = ImageTable.of(rows)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(rows):
        image = images.load_row(row, f"{split} row {i}")
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
        "stopped_after": report.stopped_after,
    }


def stage_lines(report: DemoReport, fmt: Callable[[float], str]) -> list[str]:
    """One line per stage: its wall time, and whether an earlier run's result was reused."""
    return [
        f"{name}: {fmt(sec)}" + (" (reused)" if report.reused.get(name) else "")
        for name, sec in report.stages.items()
    ]
