"""`curves.png`: training loss (and its parts) and validation accuracy of a run."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from vgdistill.atomic import write_bytes
from vgdistill.training.metrics import read_metrics

# Loss parts drawn beside the total when the run logged them with a non-zero value.
PARTS = ("loss_l1", "loss_giou", "loss_distill_img", "loss_distill_txt")


def _floats(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)):
            xs.append(float(r.get("step", 0)))
            ys.append(float(value))
    return xs, ys


def _label(ax: Any, ylabel: str, title: str, legend: bool) -> None:
    """Axis labels, title and grid of one panel (steps across), and its legend when drawn."""
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot loss vs step and val Acc@0.5 vs step from metrics.jsonl; None if there is no data."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        return None

    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    xs, ys = _floats(train, "loss")
    if xs:
        ax_loss.plot(xs, ys, label="loss", color="black", linewidth=1.5)
    for part in PARTS:
        px, py = _floats(train, part)
        if px and any(v != 0 for v in py):
            ax_loss.plot(px, py, label=part.removeprefix("loss_"), linewidth=1)
    _label(ax_loss, "training loss", "Training loss", legend=bool(xs))

    for split in sorted({str(r.get("split")) for r in evals}):
        rows = [r for r in evals if str(r.get("split")) == split]
        ex, ey = _floats(rows, "acc50")
        if ex:
            ax_acc.plot(ex, [100 * v for v in ey], marker="o", label=f"{split} Acc@0.5")
    _label(ax_acc, "accuracy (%)", "Validation Acc@0.5", legend=bool(evals))

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out_path = Path(out_path)
    write_bytes(out_path, buf.getvalue())
    return out_path
