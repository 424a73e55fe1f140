"""`vgdistill bench` in rich tables: fast vs plain path, each speed feature, GPU targets."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from rich.table import Table


def _fmt(x: Any, unit: str = "", digits: int = 1) -> str:
    """A figure with thousands separators; digits < 0 means three significant digits."""
    if x is None:
        return "-"
    if digits < 0:
        digits = max(0, 2 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:,.{digits}f}{unit}"


def bench_tables(result: dict[str, Any]) -> list[Table]:
    """Rich tables: fast vs plain figures, each optimisation alone, and GPU targets (or, for
    a bench on a prepared dataset, its loader and evaluation)."""
    if "dataset" in result:
        return [_loader_table(result), _dataset_eval_table(result)]
    tables = [_main_table(result)]
    if result.get("optimisations"):
        tables.append(_optimisations_table(result["optimisations"]))
    if result.get("targets"):
        tables.append(_targets_table(result["targets"]))
    return tables


def load_note(result: dict[str, Any]) -> str | None:
    """A warning when a CPU bench ran on a machine loaded beyond its cores, else None."""
    load, cores = result.get("load_average_start"), os.cpu_count() or 1
    if not result["device"].startswith("cpu") or load is None or load <= cores:
        return None
    return (
        f"[yellow]note:[/] load average {load:.1f} on {cores} cores: other processes share "
        "this CPU, so absolute figures are noisy (fast/plain ratios are paired per window); "
        "--threads 1 avoids OpenMP threads spinning against them."
    )


def _main_table(result: dict[str, Any]) -> Table:
    """Train, eval, memory and TFLOP/s figures per path, then FLOPs and the data pipeline."""
    r = result["recipe"]
    title = (
        f"bench: {r['backbone']} {r['image_size']}px L={r['max_query_len']} "
        f"batch {result['batch_size']} (eval {result['eval_batch_size']}), "
        f"{r['mixed_precision']} autocast, on {result['device']}"
    )
    has_plain = "plain" in result["train"]
    t = Table(title=title, title_justify="left")
    t.add_column("figure")
    t.add_column("fast path", justify="right")
    if has_plain:
        t.add_column("plain path", justify="right")
        t.add_column("fast / plain", justify="right")

    def add(label: str, get: Callable[[str], Any], ratio: Any = "", digits: int = 1) -> None:
        cells = [label, _fmt(get("fast"), "", digits)]
        if has_plain:
            ratio = _fmt(ratio, "x", 2) if isinstance(ratio, float) else ratio
            cells += [_fmt(get("plain"), "", digits), ratio]
        t.add_row(*cells)

    _path_rows(result, add)
    for label, value, digits in _single_rows(result):
        t.add_row(label, _fmt(value, "", digits), *([""] * (2 * has_plain)))
    return t


def _path_rows(result: dict[str, Any], add: Callable[..., None]) -> None:
    """The rows with a figure per path (and their fast / plain ratio)."""
    train, ev = result["train"], result["eval"]
    speedup = result.get("speedup", {})
    teacher = "images_per_s_with_teacher" in train["fast"]
    add("train step img/s (student)", lambda p: train[p]["images_per_s"], speedup.get("train"))
    if teacher:
        add(
            "train step img/s (student + teacher)",
            lambda p: train[p]["images_per_s_with_teacher"],
            speedup.get("train+teacher"),
        )
        add("teacher overhead % of the step", lambda p: train[p]["teacher_overhead_pct"])
    if "images_per_s_cached" in train["fast"]:
        add(
            "train step img/s (cached visual tokens)",
            lambda p: train[p]["images_per_s_cached"],
            speedup.get("train cached"),
        )
        add("cached step / full step", lambda p: train[p]["cached_speedup"], digits=2)
    add("eval img/s", lambda p: ev[p]["images_per_s"], speedup.get("eval"))
    key = "peak_memory_mb_with_teacher" if teacher else "peak_memory_mb"
    add(f"peak memory train MiB ({result['memory_kind']})", lambda p: train[p][key], digits=0)
    add("peak memory eval MiB", lambda p: ev[p]["peak_memory_mb"], digits=0)
    key = "tflops_with_teacher" if teacher else "tflops"
    add("achieved TFLOP/s train", lambda p: train[p][key], digits=-1)
    add("achieved TFLOP/s eval", lambda p: ev[p]["tflops"], digits=-1)


def _single_rows(result: dict[str, Any]) -> list[tuple[str, Any, int]]:
    """The rows with one figure: FLOPs per image and the data pipeline."""
    fl = result["flops"]
    rows: list[tuple[str, Any, int]] = [
        ("GFLOP / train image (student fwd+bwd)", fl["train_per_image"] / 1e9, -1),
        ("GFLOP / eval image", fl["eval_per_image"] / 1e9, -1),
        ("GFLOP / teacher image (fwd)", fl["teacher_image_per_image"] / 1e9, -1),
    ]
    if "data" in result:
        d = result["data"]
        rows += [
            (f"data pipeline img/s ({d['workers']} workers)", d["images_per_s"], 1),
            ("data pipeline img/s (one process)", d["images_per_s_one_process"], 1),
            ("workers to keep up with the fast step", d.get("workers_to_keep_up"), 0),
        ]
    return rows


def _optimisations_table(items: list[dict[str, Any]]) -> Table:
    """Each speed feature switched off alone: on and off images/s and their ratio."""
    o = Table(title="each speed feature switched off alone (train step)", title_justify="left")
    for col in ("feature", "on img/s", "off img/s", "on / off"):
        o.add_column(col, justify="left" if col == "feature" else "right")
    for item in items:
        o.add_row(
            item["label"],
            _fmt(item["on_images_per_s"]),
            _fmt(item["off_images_per_s"]),
            _fmt(item["speedup"], "x", 2),
        )
    return o


def _targets_table(targets: dict[str, Any]) -> Table:
    """The GPU targets next to the measured figures."""
    g = Table(title="H200 targets (paper settings: 640 px, batch 64, L=20, bf16)")
    for col in ("target", "goal", "measured", "met"):
        g.add_column(col)
    for name, v in targets.items():
        g.add_row(name, _fmt(v["target"]), _fmt(v["measured"]), "yes" if v["met"] else "no")
    return g


def _loader_table(result: dict[str, Any]) -> Table:
    """Loader images/s per core, uint8 vs normalising in the loader, and what each drew."""
    d = result["dataset"]
    lo = d["loader"]
    ops = ", ".join(lo["augment_ops"]) or "none"
    t = Table(
        title=f"loader per core on {d['path']} ({d['train_split']}, {lo['image_size']}px, "
        f"batch {lo['batch_size']}; augmentation: {ops}; crop {lo['crop']})",
        title_justify="left",
    )
    for col in ("figure", "uint8 (now)", "float in the loader (before)", "now / before"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    new, old = lo["uint8"], lo["float_in_worker"]
    t.add_row(
        "images/s (one core)",
        _fmt(new["images_per_s"]),
        _fmt(old["images_per_s"]),
        _fmt(lo["speedup"], "x", 2),
    )
    a, b = new["augmentation"], old["augmentation"]
    for label, key in (
        ("flipped share", "flip_share"),
        ("mean |scale|", "mean_scale"),
        ("mean image area share", "mean_image_area"),
    ):
        t.add_row(label, _fmt(a[key], "", 4), _fmt(b[key], "", 4), "")
    t.add_row(
        "mean box cx, cy, w, h",
        ", ".join(_fmt(v, "", 3) for v in a["mean_box_cxcywh"]),
        ", ".join(_fmt(v, "", 3) for v in b["mean_box_cxcywh"]),
        "",
    )
    t.add_row("same draws / same pixels", "", "", _yes(lo["same_augmentation"], lo["same_pixels"]))
    return t


def _yes(*flags: bool) -> str:
    """"yes" when every flag holds, else "NO"."""
    return "yes" if all(flags) else "[red]NO[/]"


def _dataset_eval_table(result: dict[str, Any]) -> Table:
    """Evaluation with one visual pass per image against one per expression."""
    d = result["dataset"]
    ev = d["eval"]
    shared, per_row = ev["shared"], ev["per_row"]
    t = Table(
        title=f"evaluation on {d['eval_split']}: {ev['rows']} expressions of "
        f"{shared['images']} images, batch {ev['batch_size']}, random weights",
        title_justify="left",
    )
    for col in ("figure", "shared visual pass", "per row", "shared / per row"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    t.add_row(
        "expressions/s",
        _fmt(shared["expressions_per_s"]),
        _fmt(per_row["expressions_per_s"]),
        _fmt(ev["speedup"], "x", 2),
    )
    t.add_row("images/s", _fmt(shared["images_per_s"]), _fmt(per_row["images_per_s"]), "")
    t.add_row(
        "Acc@0.5 %",
        _fmt(100 * shared["acc50"], "", 2),
        _fmt(100 * per_row["acc50"], "", 2),
        "same" if ev["same_acc50"] else "[red]differs[/]",
    )
    t.add_row(
        "mean IoU", _fmt(shared["miou"], "", 4), _fmt(per_row["miou"], "", 4),
        f"diff {ev['miou_difference']:.1e}",
    )  # fmt: skip
    return t
