"""Ablation planning: the factors, the variants of a recipe and their run folders."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgdistill.errors import VGError
from vgdistill.recipe import DistillConfig, Recipe, changed_keys, load_recipe
from vgdistill.training.rundir import RunDir

LOG_FILE = "ablate.log"


@dataclass(frozen=True)
class Factor:
    """One ablation axis: a command-line option mapped to a recipe key."""

    label: str
    option: str
    key: str
    help: str

    @property
    def field_name(self) -> str:
        """The DistillConfig field this factor sets."""
        return self.key.split(".", 1)[1]

    def choices(self) -> tuple[str, ...] | None:
        """Allowed command-line values (None for numbers)."""
        if self.label == "teacher":
            return ("frozen", "trainable")
        for f in dataclasses.fields(DistillConfig):
            if f.name == self.field_name:
                return f.metadata.get("choices")
        return None

    def parse(self, text: str) -> list[Any]:
        """'cosine,l1' -> recipe values, in order, duplicates dropped; VGError names valid ones."""
        items = [item.strip() for item in text.split(",")]
        if not any(items) or not all(items):
            raise VGError(f"{self.option} takes a comma list without empty items, got {text!r}")
        values: list[Any] = []
        choices = self.choices()
        for item in items:
            if choices is not None:
                if item not in choices:
                    raise VGError(
                        f"{self.option}: unknown value {item!r}; valid: {', '.join(choices)}"
                    )
                value: Any = item == "trainable" if self.label == "teacher" else item
            else:
                try:
                    value = float(item)
                except ValueError:
                    raise VGError(f"{self.option}: {item!r} is not a number") from None
                if not math.isfinite(value) or value < 0:
                    raise VGError(f"{self.option}: {item!r} must be a finite number >= 0")
            if value not in values:
                values.append(value)
        return values

    def show(self, value: Any) -> str:
        """How a value is written in names and tables (True -> 'trainable', 1.0 -> '1')."""
        if self.label == "teacher":
            return "trainable" if value else "frozen"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)


FACTORS: dict[str, Factor] = {
    f.label: f
    for f in (
        Factor("position", "--distill-pos", "distill.position", "fusion, linear, backbone, cnn"),
        Factor("loss", "--loss", "distill.loss", "cosine, l1, mse"),
        Factor("modality", "--modality", "distill.modality", "both, image, text, none"),
        Factor("teacher", "--teacher", "distill.teacher_trainable", "frozen, trainable"),
        Factor("alpha", "--alpha", "distill.alpha", "image distillation weight"),
        Factor("beta", "--beta", "distill.beta", "text distillation weight"),
        Factor("view", "--teacher-view", "distill.teacher_view", "padded, image"),
    )
}


def toml_value(value: Any) -> str:
    """A Python value written as a TOML literal for `--set key=value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (same escapes as JSON for our values)


@dataclass
class Run:
    """One (variant, seed): a run folder."""

    seed: int
    dir: Path
    extra_seed: bool = False
    """True for seeds other than the recipe's own (they need a train.seed override)."""

    @property
    def folder(self) -> RunDir:
        """The run folder's files."""
        return RunDir(self.dir)

    @property
    def log(self) -> Path:
        """Where the child processes' output goes."""
        return self.dir / LOG_FILE

    def results(self) -> dict[str, Any] | None:
        """The run's eval.json results {split: metrics}, or None if absent or unreadable."""
        return self.folder.read_eval()

    def status(self) -> str:
        """'done' (eval.json present), 'partial' (started), or 'new'."""
        if self.results() is not None:
            return "done"
        if self.folder.recipe.exists() or self.folder.state_root.exists():
            return "partial"
        return "new"


@dataclass
class Variant:
    """The recipe plus `changes`; one run per seed."""

    name: str
    changes: dict[str, Any]  # recipe key -> value; empty for the baseline
    values: dict[str, Any]  # factor label -> value, for every factor in the ablation
    runs: list[Run] = field(default_factory=list)

    def overrides(self, run: Run | None = None) -> list[str]:
        """The `--set` items that turn the recipe into this variant (and this run's seed)."""
        sets = [f"{key}={toml_value(value)}" for key, value in self.changes.items()]
        if run is not None and run.extra_seed:
            sets.append(f"train.seed={run.seed}")
        return sets


def variant_name(changes: dict[str, Any]) -> str:
    """'baseline' or e.g. 'loss-l1_alpha-0.5' (also the folder name)."""
    if not changes:
        return "baseline"
    by_key = {f.key: f for f in FACTORS.values()}
    return "_".join(f"{by_key[k].label}-{by_key[k].show(v)}" for k, v in changes.items())


def plan(
    base: Recipe,
    factors: dict[str, list[Any]],
    grid: bool,
    seeds: int,
    out: Path,
) -> list[Variant]:
    """The baseline first, then one-at-a-time changes (or every grid cell), with run folders.

    A value equal to the recipe's own is the baseline, so it is not run twice. Seeds are the
    recipe's train.seed, +1, +2, ...
    """
    if seeds < 1:
        raise VGError(f"--seeds must be >= 1, got {seeds}")
    unknown = [k for k in factors if k not in FACTORS]
    if unknown:
        raise VGError(f"unknown factor {unknown[0]!r}; valid: {', '.join(FACTORS)}")
    baseline = {label: getattr(base.distill, FACTORS[label].field_name) for label in factors}

    def changes_of(values: dict[str, Any]) -> dict[str, Any]:
        return {FACTORS[k].key: v for k, v in values.items() if v != baseline[k]}

    rows: list[dict[str, Any]] = [dict(baseline)]
    if grid:
        labels = list(factors)
        rows += [
            dict(zip(labels, cell, strict=True)) for cell in itertools.product(*factors.values())
        ]
    else:
        for label, values in factors.items():
            rows += [{**baseline, label: v} for v in values]
    variants: list[Variant] = []
    seen: set[str] = set()
    for values in rows:
        changes = changes_of(values)
        name = variant_name(changes)
        if name in seen:
            continue
        seen.add(name)
        variant = Variant(name=name, changes=changes, values=values)
        # The recipe's own seed runs in out/NAME, extra seeds beside it in out/NAME_seed-N:
        # raising --seeds later reuses the runs already done.
        first = base.train.seed
        variant.runs = [
            Run(s, out / (name if s == first else f"{name}_seed-{s}"), extra_seed=s != first)
            for s in range(first, first + seeds)
        ]
        variants.append(variant)
    return variants


def check_variants(recipe_path: Path, overrides: list[str], variants: list[Variant]) -> None:
    """Load every variant's recipe now, so a bad combination fails before any training."""
    for variant in variants:
        try:
            load_recipe(recipe_path, [*overrides, *variant.overrides()])
        except VGError as e:
            raise VGError(f"variant {variant.name}: {e}") from None


def idle_changes(variant: Variant, base: Recipe) -> list[str]:
    """The variant's changed keys that cannot matter for its modality (e.g. any distillation
    setting when distill.modality = none, alpha or the teacher's view when only text is
    distilled)."""
    modality = variant.changes.get("distill.modality", base.distill.modality)
    idle = []
    for key in variant.changes:
        if key == "distill.modality":
            continue
        if (
            modality == "none"
            or (key in ("distill.alpha", "distill.teacher_view") and modality == "text")
            or (key == "distill.beta" and modality == "image")
        ):
            idle.append(key)
    return idle


def recipe_drift(run_dir: Path, recipe_path: Path, overrides: list[str]) -> list[str]:
    """Keys where a finished run's recipe.toml differs from what this ablation would train."""
    try:
        old = load_recipe(RunDir(run_dir).recipe)
    except VGError:
        return []  # no readable recipe (e.g. results copied in by hand): nothing to compare
    return changed_keys(old, load_recipe(recipe_path, overrides))
