"""Ablation summary: Acc@0.5 per variant and split (mean ± std over seeds), written as
summary.csv, summary.json and summary.md (a paper-style table)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vgdistill.atomic import write_text
from vgdistill.report.tables import mean_std
from vgdistill.tools.ablate.plan import FACTORS, Run, Variant
from vgdistill.tools.ablate.runner import RunOutcome

SUMMARY_FILES = ("summary.csv", "summary.json", "summary.md")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # sample std over seeds
    return mean, math.sqrt(var)


def _run_record(run: Run, splits: Sequence[str], outcome: RunOutcome | None) -> dict[str, Any]:
    """One run's status and Acc@0.5 (percent) per split."""
    results = run.results()
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
    return {
        "seed": run.seed,
        "dir": str(run.dir),
        "log": str(run.log),
        "status": status,
        "error": error,
        "acc50_pct": acc,
    }


def _variant_row(
    variant: Variant, splits: Sequence[str], outcomes: dict[str, RunOutcome]
) -> dict[str, Any]:
    """A variant's runs, its overall status and its Acc@0.5 mean/std over the finished seeds."""
    runs = [_run_record(run, splits, outcomes.get(str(run.dir))) for run in variant.runs]
    ok = [r for r in runs if r["status"] == "ok"]
    if len(ok) == len(runs):
        status = "ok"
    elif any(r["status"] == "failed" for r in runs):
        status = "failed"
    else:
        status = "unfinished"
    stats = {}
    for split in splits:
        mean, std = _mean_std([r["acc50_pct"][split] for r in ok if split in r["acc50_pct"]])
        stats[split] = {"mean": mean, "std": std, "n": sum(split in r["acc50_pct"] for r in ok)}
    return {
        "name": variant.name,
        "changes": dict(variant.changes),
        "values": {k: FACTORS[k].show(v) for k, v in variant.values.items()},
        "status": status,
        "seeds_ok": len(ok),
        "seeds": len(runs),
        "acc50_pct": stats,
        "runs": runs,
    }


def _compare(rows: list[dict[str, Any]], splits: Sequence[str]) -> None:
    """Add each row's difference from the baseline and the splits where it is best."""
    base = next((r for r in rows if r["name"] == "baseline"), None)
    for row in rows:
        row["delta_pct"] = {}
        for split in splits:
            mean = row["acc50_pct"][split]["mean"]
            ref = base["acc50_pct"][split]["mean"] if base else None
            row["delta_pct"][split] = None if mean is None or ref is None else mean - ref
    best: dict[str, float | None] = {}
    for split in splits:
        present = [r["acc50_pct"][split]["mean"] for r in rows]
        present = [m for m in present if m is not None]
        best[split] = max(present) if present else None
    for row in rows:
        row["best"] = [
            s
            for s in splits
            if best[s] is not None
            and row["acc50_pct"][s]["mean"] is not None
            and math.isclose(row["acc50_pct"][s]["mean"], best[s], abs_tol=1e-9)
        ]


def summarise(
    variants: list[Variant],
    splits: Sequence[str],
    outcomes: dict[str, RunOutcome] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary record: per variant and split Acc@0.5 (percent) mean/std, delta, best."""
    rows = [_variant_row(variant, splits, outcomes or {}) for variant in variants]
    _compare(rows, splits)
    return {
        **(meta or {}),
        "splits": list(splits),
        "factors": list(variants[0].values) if variants else [],
        "variants": rows,
    }


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
            text = mean_std(st["mean"], st["std"])
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
    paths = [out / name for name in SUMMARY_FILES]
    write_text(paths[0], to_csv(summary))
    write_text(paths[1], json.dumps(summary, indent=2) + "\n")
    write_text(paths[2], to_markdown(summary))
    return paths
