"""`curves.png`: training loss (and its parts) and validation accuracy of a run."""

from __future__ import annotations

import io
from pathlib import Path

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
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    if xs:
        ax_loss.legend(fontsize=8)

    for split in sorted({str(r.get("split")) for r in evals}):
        rows = [r for r in evals if str(r.get("split")) == split]
        ex, ey = _floats(rows, "acc50")
        if ex:
            ax_acc.plot(ex, [100 * v for v in ey], marker="o", label=f"{split} Acc@0.5")
    ax_acc.set_xlabel("optimiser step")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Validation Acc@0.5")
    ax_acc.grid(alpha=0.3)
    if evals:
        ax_acc.legend(fontsize=8)

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out_path = Path(out_path)
    write_bytes(out_path, buf.getvalue())
    return out_path
