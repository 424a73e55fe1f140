"""The GPU targets a CUDA bench is read against."""

from __future__ import annotations

from typing import Any

# What the speed issue asked of one H200 at paper settings (640 px, batch 64,
# max_query_len 20, bf16, distillation on): the yardstick a CUDA measurement is shown next
# to; a CPU's figures are never judged against it.
# Throughputs are floors, the teacher's overhead (in % of the student-only step) a ceiling;
# "*" holds the targets of every backbone.
GPU_TARGETS: dict[str, dict[str, float]] = {
    "resnet50": {"train_images_per_s": 900.0, "eval_images_per_s": 3000.0},
    "swin_s": {"train_images_per_s": 350.0},
    "*": {"teacher_overhead_pct": 3.0},
}
CEILINGS = frozenset({"teacher_overhead_pct"})
"""Targets a measurement meets by staying at or below them."""


def compare_targets(backbone: str, result: dict[str, Any]) -> dict[str, Any]:
    """Each target of `backbone` next to its measured figure, and whether it is met."""
    fast = result["train"]["fast"]
    measured = {
        "train_images_per_s": fast.get("images_per_s_with_teacher", fast["images_per_s"]),
        "eval_images_per_s": result["eval"]["fast"]["images_per_s"],
        "teacher_overhead_pct": fast.get("teacher_overhead_pct"),
    }
    goals = {**GPU_TARGETS.get(backbone, {}), **GPU_TARGETS["*"]}
    out: dict[str, Any] = {}
    for name, value in measured.items():
        if name not in goals or value is None:
            continue
        target = goals[name]
        met = value <= target if name in CEILINGS else value >= target
        out[name] = {"target": target, "measured": value, "met": met}
    return out
