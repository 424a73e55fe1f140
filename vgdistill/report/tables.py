"""Every rich table the commands print (bench's live in report/bench.py).

Each function turns a result record into a `rich.table.Table`; none computes or reads files.
Metrics arrive as fractions in [0, 1] and are printed as percentages unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from vgdistill.tools.ablate.plan import Variant
    from vgdistill.tools.grounder import Grounding


def mean_std(mean: float | None, std: float | None) -> str:
    """'12.34', '12.34 ± 0.56', or '-' when there is no value."""
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def results_table(results: dict[str, dict[str, Any]], title: str = "Evaluation") -> Table:
    """`evaluate` results per split (percentages; shuffle-control columns when present)."""
    control = any("shuffle" in m for m in results.values())
    table = Table(title=title)
    table.add_column("split")
    table.add_column("count", justify="right")
    table.add_column("Acc@0.5", justify="right")
    table.add_column("Acc@0.75", justify="right")
    table.add_column("mIoU", justify="right")
    if control:
        table.add_column("Acc@0.5 shuffled", justify="right")
        table.add_column("mIoU shuffled", justify="right")
    table.add_column("phrases/s", justify="right")
    for split, m in results.items():
        row = [
            split,
            str(m["count"]),
            f"{100 * m['acc50']:.2f}",
            f"{100 * m['acc75']:.2f}",
            f"{100 * m['miou']:.2f}",
        ]
        if control:
            s = m.get("shuffle")
            row += [f"{100 * s['acc50']:.2f}", f"{100 * s['miou']:.2f}"] if s else ["-", "-"]
        row.append(f"{m['expressions_per_s']:.1f}")
        table.add_row(*row)
    return table


def demo_table(results: dict[str, dict[str, Any]], out: Path) -> Table:
    """The demo's closing table: Acc@0.5 per split with the shuffled-phrase control."""
    table = Table(title=f"vgdistill demo — results in {out}")
    table.add_column("split")
    table.add_column("Acc@0.5", justify="right", style="bold")
    table.add_column("shuffled phrases", justify="right")
    table.add_column("rows", justify="right")
    for split, res in results.items():
        shuffled = res.get("shuffle", {}).get("acc50")
        table.add_row(
            split,
            f"{100 * res['acc50']:.1f}",
            "—" if shuffled is None else f"{100 * shuffled:.1f}",
            str(res["count"]),
        )
    return table


def prepare_table(manifest: dict[str, Any]) -> Table:
    """`prepare`'s counts: rows read, kept, clipped and dropped by reason, a column per split."""
    from vgdistill.data.prepare import DROP_REASONS

    counts = manifest["counts"]
    splits = list(counts)
    table = Table(title=f"prepare {manifest['source']}")
    table.add_column("rows", no_wrap=True)
    for split in splits:
        table.add_column(split, justify="right", no_wrap=True)
    if len(splits) > 1:
        table.add_column("total", justify="right", no_wrap=True, style="bold")

    def add(label: str, values: list[int], style: str | None = None) -> None:
        cells = [f"{v:,}" for v in values]
        if len(splits) > 1:
            cells.append(f"{sum(values):,}")
        table.add_row(label, *cells, style=style)

    add("read", [counts[s]["read"] for s in splits])
    add("kept", [counts[s]["kept"] for s in splits], style="green")
    add("  of which clipped", [counts[s].get("clipped", 0) for s in splits])
    for reason in DROP_REASONS:
        values = [counts[s]["dropped"].get(reason, 0) for s in splits]
        add(f"dropped: {reason}", values, style="yellow" if any(values) else "dim")
    return table


def prepare_notes(manifest: dict[str, Any]) -> list[str]:
    """Lines under `prepare`'s table: EXIF-tagged images and their frames, a size mismatch."""
    lines = []
    exif = manifest.get("exif") or {}
    if exif.get("tagged"):
        by = ", ".join(f"{o}: {n}" for o, n in exif["orientations"].items())
        lines.append(
            f"EXIF-tagged images: {exif['tagged']} (orientation {by}); kept in the stored frame "
            f"{exif['stored']}, turned upright {exif['upright']}, size matched neither "
            f"{exif['size_matched_neither']} (--exif-frame {exif['rule']})"
        )
    mismatches = manifest.get("size_mismatch_examples") or []
    if mismatches:
        lines.append(f"image size mismatch, e.g. {mismatches[0]}")
    return lines


def detector_table(report: dict[str, Any], split: str) -> Table:
    """The detector's validation figures."""
    m = report["metrics"]
    table = Table(
        title=f"detector on '{split}' ({report['data']['val_images']} images, "
        f"{len(report['categories'])} categories)"
    )
    table.add_column("objects found@0.5", justify="right", style="bold")
    table.add_column("category accuracy", justify="right")
    table.add_column("objects", justify="right")
    table.add_row(f"{m['found50']:.3f}", f"{m['category_acc']:.3f}", str(m["objects"]))
    return table


def retrieval_table(report: dict[str, Any], split: str) -> Table:
    """The teacher's validation retrieval (R@1 before/after fitting, R@5, chance)."""
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    table = Table(
        title=f"teacher retrieval on '{split}' "
        f"({int(after['images'])} images, {int(after['texts'])} distinct phrases)"
    )
    table.add_column("direction")
    table.add_column("R@1 before", justify="right")
    table.add_column("R@1", justify="right", style="bold")
    table.add_column("R@5", justify="right")
    table.add_column("chance R@1", justify="right")
    for key, name in (("i2t", "image -> phrase"), ("t2i", "phrase -> image")):
        table.add_row(
            name,
            f"{before[f'{key}_r1']:.3f}",
            f"{after[f'{key}_r1']:.3f}",
            f"{after[f'{key}_r5']:.3f}",
            f"{after[f'{key}_chance']:.3f}",
        )
    return table


def groundings_table(found: Sequence[Grounding], title: str) -> Table:
    """`predict`'s boxes, one row per phrase, marked in the colour it is drawn in."""
    from vgdistill.report.draw import colour_for

    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("phrase")
    for name in ("x1", "y1", "x2", "y2"):
        table.add_column(name, justify="right")
    table.add_column("w x h", justify="right")
    for i, g in enumerate(found):
        r, gr, b = colour_for(i)
        x1, y1, x2, y2 = g.box
        table.add_row(
            f"[rgb({r},{gr},{b})]■[/] {i + 1}",
            g.phrase,
            *(f"{v:.1f}" for v in g.box),
            f"{x2 - x1:.0f} x {y2 - y1:.0f}",
        )
    return table


def ablation_plan_table(variants: Sequence[Variant], grid: bool) -> Table:
    """`ablate --dry-run`: every (variant, seed) with its changes, run folder and status."""
    n_runs = sum(len(v.runs) for v in variants)
    mode = "grid" if grid else "one factor at a time"
    table = Table(title=f"{len(variants)} variants, {n_runs} runs ({mode})")
    table.add_column("#", justify="right")
    table.add_column("variant", style="bold")
    table.add_column("changes (--set)")
    table.add_column("seed", justify="right")
    table.add_column("run folder")
    table.add_column("status")
    styles = {"done": "[green]done (skipped)[/]", "partial": "[yellow]partial (resumed)[/]"}
    i = 0
    for v in variants:
        changes = " ".join(v.overrides()) or "(the recipe as written)"
        for run in v.runs:
            i += 1
            status = run.status()
            table.add_row(
                str(i), v.name, changes, str(run.seed), str(run.dir), styles.get(status, "new")
            )
    return table


def ablation_table(summary: dict[str, Any], title: str = "Ablation") -> Table:
    """The ablation summary: a row per variant, Acc@0.5 and delta per split, best marked *."""
    from vgdistill.tools.ablate.plan import FACTORS

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
            cells += _ablation_cells(row, s)
        cells.append(_ablation_status(row))
        table.add_row(*cells)
    return table


def _ablation_cells(row: dict[str, Any], split: str) -> list[str]:
    """Acc@0.5 (green and starred when best) and its delta from the baseline."""
    st = row["acc50_pct"][split]
    text = mean_std(st["mean"], st["std"])
    if split in row["best"]:
        text = f"[bold green]{text} *[/]"
    delta = row["delta_pct"][split]
    if delta is None or row["name"] == "baseline":
        return [text, "-"]
    d = f"{delta:+.2f}"
    return [text, f"[green]{d}[/]" if delta > 0 else f"[red]{d}[/]" if delta < 0 else d]


def _ablation_status(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return "[green]ok[/]" + (f" ({row['seeds']} seeds)" if row["seeds"] > 1 else "")
    if row["status"] == "failed":
        logs = ", ".join(r["log"] for r in row["runs"] if r["status"] == "failed")
        return f"[red]failed[/] ({row['seeds_ok']}/{row['seeds']} ok; log: {logs})"
    return f"[yellow]unfinished[/] ({row['seeds_ok']}/{row['seeds']} done)"


def recipes_table(recipes: Sequence[tuple[str, str]]) -> Table:
    """The shipped recipes: (name, one-line description) rows."""
    table = Table(title="Shipped recipes (use a name wherever a recipe file goes)")
    table.add_column("name", no_wrap=True)
    table.add_column("what it is")
    for name, description in recipes:
        table.add_row(escape(name), escape(description))
    return table
