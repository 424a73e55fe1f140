"""Ablations: plan variants of a recipe, train and evaluate each in its own process, summarise.

A variant is the recipe plus a few `--set` changes to the distillation factors the paper
ablates (position, loss, modality, teacher frozen/trainable, alpha, beta). Every (variant,
seed) is an ordinary run folder under the ablation folder, trained by `vgdistill train` and
scored by `vgdistill eval` in child processes, so a crash or an out-of-memory kill in one
variant loses nothing else. A run whose eval.json exists is finished and skipped on a re-run;
one that was cut off is continued with `train --resume`.

This module imports no torch: the parent process only plans, waits and summarises.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgdistill.errors import VGError
from vgdistill.recipe import DistillConfig, Recipe, load_recipe

EVAL_FILE = "eval.json"
LOG_FILE = "ablate.log"
SUMMARY_FILES = ("summary.csv", "summary.json", "summary.md")


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
        Factor("position", "--distill-pos", "distill.position", "fusion, linear, backbone"),
        Factor("loss", "--loss", "distill.loss", "cosine, l1, mse"),
        Factor("modality", "--modality", "distill.modality", "both, image, text, none"),
        Factor("teacher", "--teacher", "distill.teacher_trainable", "frozen, trainable"),
        Factor("alpha", "--alpha", "distill.alpha", "image distillation weight"),
        Factor("beta", "--beta", "distill.beta", "text distillation weight"),
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
    def log(self) -> Path:
        """Where the child processes' output goes."""
        return self.dir / LOG_FILE

    def status(self) -> str:
        """'done' (eval.json present), 'partial' (started), or 'new'."""
        if read_eval(self.dir) is not None:
            return "done"
        if (self.dir / "recipe.toml").exists() or (self.dir / "state").exists():
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
    setting when distill.modality = none, alpha when only text is distilled)."""
    modality = variant.changes.get("distill.modality", base.distill.modality)
    idle = []
    for key in variant.changes:
        if key == "distill.modality":
            continue
        if (
            modality == "none"
            or (key == "distill.alpha" and modality == "text")
            or (key == "distill.beta" and modality == "image")
        ):
            idle.append(key)
    return idle


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """The run's eval.json results {split: metrics}, or None if absent or unreadable."""
    path = run_dir / EVAL_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    results = record.get("results") if isinstance(record, dict) else None
    return results if isinstance(results, dict) else None


def recipe_drift(run_dir: Path, recipe_path: Path, overrides: list[str]) -> list[str]:
    """Keys where a finished run's recipe.toml differs from what this ablation would train."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    try:
        old = flat(load_recipe(run_dir / "recipe.toml").to_dict())
    except VGError:
        return []  # no readable recipe (e.g. results copied in by hand): nothing to compare
    new = flat(load_recipe(recipe_path, overrides).to_dict())
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# --------------------------------------------------------------------------- running


@dataclass
class RunOutcome:
    """What happened to one run in this call."""

    status: str  # "done" (finished now), "skipped" (finished earlier), "failed"
    seconds: float = 0.0
    error: str | None = None


class Interrupted(Exception):
    """The user stopped the ablation (Ctrl-C or SIGTERM); the running child has stopped."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the ablate process dies (Linux), so an
    orphaned trainer saves a resumable state and stops instead of running on unseen."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Terminated(Exception):
    """This process got SIGTERM."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `_Terminated` while children run (main thread only; else a no-op)."""

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_child(args: list[str], log: Path) -> int:
    """Run `python -m vgdistill ARGS` with its output appended to `log`; its exit code.

    Ctrl-C reaches the child too (same process group): the trainer saves a resumable state,
    and we wait for it. A SIGTERM to this process is passed on as one stop request.
    """
    cmd = [sys.executable, "-m", "vgdistill", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": os.environ.get("COLUMNS", "120")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {_shell(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            return proc.wait()
        except (KeyboardInterrupt, _Terminated) as e:
            # Ctrl-C at a terminal reached the child too (same process group); a SIGTERM sent
            # to this process did not: pass that one on. Either way the trainer now saves a
            # resumable state and exits; wait for it.
            if isinstance(e, _Terminated):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait()
            except (KeyboardInterrupt, _Terminated):  # asked twice: stop now
                proc.kill()
                proc.wait()
            raise Interrupted from None


def _shell(cmd: list[str]) -> str:
    import shlex

    return shlex.join(cmd)


def _last_error(log: Path) -> str:
    """The child's last meaningful line (the one-line error `friendly` prints)."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith("==="):
            return text[:300]
    return ""


def run_one(
    recipe_path: Path,
    overrides: list[str],
    variant: Variant,
    run: Run,
    verbose: bool = False,
) -> RunOutcome:
    """Train (resuming whatever is there) and evaluate one run folder in child processes."""
    if run.status() == "done":
        return RunOutcome("skipped")
    start = time.monotonic()
    sets = [*overrides, *variant.overrides(run)]
    flags = ["-v"] if verbose else []
    train_args = [*flags, "train", str(recipe_path), "--out", str(run.dir), "--resume"]
    train_args += ["--no-progress"]
    for item in sets:
        train_args += ["--set", item]
    with _sigterm_raises():
        rc = run_child(train_args, run.log)
        if rc != 0:
            return RunOutcome(
                "failed", time.monotonic() - start, f"train exited {rc}: {_last_error(run.log)}"
            )
        eval_args = [*flags, "eval", str(run.dir), "--json", str(run.dir / EVAL_FILE)]
        rc = run_child(eval_args, run.log)
    if rc != 0 or read_eval(run.dir) is None:
        return RunOutcome(
            "failed", time.monotonic() - start, f"eval exited {rc}: {_last_error(run.log)}"
        )
    return RunOutcome("done", time.monotonic() - start)


def run_all(
    recipe_path: Path,
    overrides: list[str],
    variants: list[Variant],
    outcomes: dict[str, RunOutcome],
    on_event: Callable[[str, Variant, Run, RunOutcome | None], None] | None = None,
    verbose: bool = False,
) -> dict[str, RunOutcome]:
    """Run every (variant, seed) in order, filling `outcomes` (keyed by run folder) as it goes.

    A failed run is recorded and the next one starts. `Interrupted` propagates once the
    running child has stopped; `outcomes` then holds every run that ended before it.
    """
    for variant in variants:
        for run in variant.runs:
            if on_event:
                on_event("start", variant, run, None)
            outcome = run_one(recipe_path, overrides, variant, run, verbose)
            outcomes[str(run.dir)] = outcome
            if on_event:
                on_event("end", variant, run, outcome)
    return outcomes


# --------------------------------------------------------------------------- summary


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # sample std over seeds
    return mean, math.sqrt(var)


def summarise(
    variants: list[Variant],
    splits: Sequence[str],
    outcomes: dict[str, RunOutcome] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary record: per variant and split Acc@0.5 (percent) mean/std, delta, best."""
    outcomes = outcomes or {}
    rows: list[dict[str, Any]] = []
    for variant in variants:
        runs = []
        for run in variant.runs:
            results = read_eval(run.dir)
            outcome = outcomes.get(str(run.dir))
            if results is not None:
                status, error = "ok", None
            elif outcome is not None and outcome.status == "failed":
                status, error = "failed", outcome.error
            else:
                status, error = "unfinished", None
            acc = {}
            for split in splits:
                m = (results or {}).get(split)
                if isinstance(m, dict) and isinstance(m.get("acc50"), (int, float)):
                    acc[split] = 100.0 * float(m["acc50"])
            runs.append(
                {
                    "seed": run.seed,
                    "dir": str(run.dir),
                    "log": str(run.log),
                    "status": status,
                    "error": error,
                    "acc50_pct": acc,
                }
            )
        ok = [r for r in runs if r["status"] == "ok"]
        if len(ok) == len(runs):
            status = "ok"
        elif any(r["status"] == "failed" for r in runs):
            status = "failed"
        else:
            status = "unfinished"
        stats = {}
        for split in splits:
            mean, std = _mean_std(
                [r["acc50_pct"][s] for r in ok for s in [split] if s in r["acc50_pct"]]
            )
            stats[split] = {"mean": mean, "std": std, "n": sum(split in r["acc50_pct"] for r in ok)}
        rows.append(
            {
                "name": variant.name,
                "changes": dict(variant.changes),
                "values": {k: FACTORS[k].show(v) for k, v in variant.values.items()},
                "status": status,
                "seeds_ok": len(ok),
                "seeds": len(runs),
                "acc50_pct": stats,
                "runs": runs,
            }
        )
    base = next((r for r in rows if r["name"] == "baseline"), None)
    for row in rows:
        row["delta_pct"] = {}
        for split in splits:
            mean = row["acc50_pct"][split]["mean"]
            ref = base["acc50_pct"][split]["mean"] if base else None
            row["delta_pct"][split] = None if mean is None or ref is None else mean - ref
    best: dict[str, float | None] = {}
    for split in splits:
        means = [r["acc50_pct"][split]["mean"] for r in rows]
        present = [m for m in means if m is not None]
        best[split] = max(present) if present else None
    for row in rows:
        row["best"] = [
            s
            for s in splits
            if best[s] is not None
            and row["acc50_pct"][s]["mean"] is not None
            and math.isclose(row["acc50_pct"][s]["mean"], best[s], abs_tol=1e-9)
        ]
    return {
        **(meta or {}),
        "splits": list(splits),
        "factors": _factor_labels(variants),
        "variants": rows,
    }


def _factor_labels(variants: list[Variant]) -> list[str]:
    return list(variants[0].values) if variants else []


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _fmt_delta(delta: float | None, is_base: bool) -> str:
    if is_base or delta is None:
        return "-"
    return f"{delta:+.2f}"


def to_csv(summary: dict[str, Any]) -> str:
    """summary.csv: one row per variant, numbers in percent."""
    splits, labels = summary["splits"], summary["factors"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["variant", *labels, "status", "seeds_ok", "seeds"]
    for s in splits:
        header += [f"{s}_acc50_pct", f"{s}_std_pct", f"{s}_delta_pct", f"{s}_best"]
    header.append("log")
    writer.writerow(header)

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    for row in summary["variants"]:
        line = [
            row["name"],
            *(row["values"][k] for k in labels),
            row["status"],
            row["seeds_ok"],
            row["seeds"],
        ]
        for s in splits:
            st = row["acc50_pct"][s]
            line += [
                num(st["mean"]),
                num(st["std"]),
                num(row["delta_pct"][s]),
                int(s in row["best"]),
            ]
        line.append(";".join(r["log"] for r in row["runs"]))
        writer.writerow(line)
    return buf.getvalue()


def to_markdown(summary: dict[str, Any]) -> str:
    """summary.md: a paper-style table; changed factors and the best value per split in bold."""
    splits, labels = summary["splits"], summary["factors"]
    seeds = max((r["seeds"] for r in summary["variants"]), default=1)
    head = ["Variant", *labels, *(f"{s} Acc@0.5" for s in splits)]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":--"] * (1 + len(labels)) + ["--:"] * len(splits)) + "|",
    ]
    by_label = {f.label: f.key for f in FACTORS.values()}
    for row in summary["variants"]:
        cells = [row["name"]]
        for k in labels:
            v = row["values"][k]
            cells.append(f"**{v}**" if by_label[k] in row["changes"] else v)
        for s in splits:
            st = row["acc50_pct"][s]
            if st["mean"] is None:
                cells.append(row["status"])
                continue
            text = _fmt(st["mean"], st["std"])
            if s in row["best"]:
                text = f"**{text}**"
            if row["name"] != "baseline" and row["delta_pct"][s] is not None:
                text += f" ({row['delta_pct'][s]:+.2f})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Acc@0.5 in percent{f', mean ± std over {seeds} seeds' if seeds > 1 else ''}; "
        "(±x.xx) = difference from the baseline (the recipe as written); bold = changed "
        "factor / best per column."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_summary(out: Path, summary: dict[str, Any]) -> list[Path]:
    """Write summary.csv, summary.json and summary.md atomically into `out`."""
    from vgdistill.atomic import write_text

    paths = [out / name for name in SUMMARY_FILES]
    write_text(paths[0], to_csv(summary))
    write_text(paths[1], json.dumps(summary, indent=2) + "\n")
    write_text(paths[2], to_markdown(summary))
    return paths


def summary_table(summary: dict[str, Any], title: str = "Ablation") -> Any:
    """A rich table: one row per variant, Acc@0.5 and delta per split, best marked with *."""
    from rich.table import Table

    splits, labels = summary["splits"], summary["factors"]
    by_label = {f.label: f.key for f in FACTORS.values()}
    table = Table(title=title)
    table.add_column("variant", style="bold")
    for k in labels:
        table.add_column(k)
    for s in splits:
        table.add_column(f"{s} Acc@0.5", justify="right")
        table.add_column("Δ", justify="right")
    table.add_column("status")
    for row in summary["variants"]:
        cells = [row["name"]]
        for k in labels:
            v = row["values"][k]
            cells.append(f"[yellow]{v}[/]" if by_label[k] in row["changes"] else f"[dim]{v}[/]")
        for s in splits:
            st = row["acc50_pct"][s]
            text = _fmt(st["mean"], st["std"])
            if s in row["best"]:
                text = f"[bold green]{text} *[/]"
            delta = row["delta_pct"][s]
            d = _fmt_delta(delta, row["name"] == "baseline")
            if delta is not None and row["name"] != "baseline":
                d = f"[green]{d}[/]" if delta > 0 else f"[red]{d}[/]" if delta < 0 else d
            cells += [text, d]
        if row["status"] == "ok":
            status = "[green]ok[/]"
            if row["seeds"] > 1:
                status += f" ({row['seeds']} seeds)"
        elif row["status"] == "failed":
            logs = ", ".join(r["log"] for r in row["runs"] if r["status"] == "failed")
            status = f"[red]failed[/] ({row['seeds_ok']}/{row['seeds']} ok; log: {logs})"
        else:
            status = f"[yellow]unfinished[/] ({row['seeds_ok']}/{row['seeds']} done)"
        cells.append(status)
        table.add_row(*cells)
    return table
