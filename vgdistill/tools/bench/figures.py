"""The model-side figures of a bench: which configurations are timed, and the result's
train, eval, speed-up and per-feature figures from their windows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vgdistill.tools.bench.fastpath import FEATURE_LABELS, PLAIN, FastPath
from vgdistill.tools.bench.timing import Config, PeakMemory, measure, paired_ratio

if TYPE_CHECKING:
    from vgdistill.tools.bench import BenchOptions
    from vgdistill.tools.bench.rig import Rig


@dataclass
class Plan:
    """The configurations one bench times."""

    configs: list[Config]
    kinds: list[str]
    """Train steps compared fast vs plain: "train", "train+teacher", "train cached"."""
    full: str
    """The full training step (with the teacher when there is one)."""
    features: list[str]
    """Speed features switched off alone (--each)."""
    paths: tuple[str, ...]
    """"fast", and "plain" when the plain path is timed."""

    def __post_init__(self) -> None:
        self.by_name = {c.name: c for c in self.configs}


def plan(rig: Rig, fast: FastPath, opts: BenchOptions) -> Plan:
    """Every configuration to time, in the order their windows run."""
    kinds = ["train"] + (["train+teacher"] if rig.teacher is not None else [])
    configs = [Config("fast " + k, fast, k) for k in kinds]
    if opts.plain:
        configs += [Config("plain " + k, PLAIN, k) for k in kinds]
    full = kinds[-1]
    if rig.cached_batches is not None:
        kinds.append("train cached")
        configs.append(Config("fast train cached", fast, "train cached"))
        if opts.plain:
            configs.append(Config("plain train cached", PLAIN, "train cached"))
    features = [n for n, on in fast.switches().items() if on] if opts.each else []
    configs += [Config(f"fast - {n}", fast.without(n), full) for n in features]
    configs.append(Config("fast eval", fast, "eval"))
    if opts.plain:
        configs.append(Config("plain eval", PLAIN, "eval"))
    paths = ("fast", "plain") if opts.plain else ("fast",)
    return Plan(configs, kinds, full, features, paths)


def model_figures(rig: Rig, opts: BenchOptions, say: Callable[[str], None]) -> dict[str, Any]:
    """Count FLOPs, time every configuration, and return the result's model-side keys."""
    memory = PeakMemory(rig.device)
    fast = rig.fast_path()
    say("counting FLOPs")
    flops = rig.count_flops(min(rig.batch, 2))
    p = plan(rig, fast, opts)
    measure(rig, p.configs, opts, memory, say)
    by_name = p.by_name
    out: dict[str, Any] = {
        "flops": flops,
        "fast_path": fast.switches(),
        "memory_kind": memory.kind,
        "train": {path: _train_figures(by_name, path, flops, p.full) for path in p.paths},
        "eval": {path: _eval_figures(by_name[f"{path} eval"], flops) for path in p.paths},
    }
    if opts.plain:
        out["speedup"] = {
            k: paired_ratio(by_name[f"fast {k}"], by_name[f"plain {k}"]) for k in (*p.kinds, "eval")
        }
    full = by_name[f"fast {p.full}"]
    out["optimisations"] = [
        {
            "name": n,
            "label": FEATURE_LABELS[n],
            "step": p.full,
            "on_images_per_s": full.images_per_s,
            "off_images_per_s": by_name[f"fast - {n}"].images_per_s,
            "speedup": paired_ratio(full, by_name[f"fast - {n}"]),
        }
        for n in p.features
    ]
    if rig.teacher is not None:
        out["teacher_cache"] = {
            "hits": rig.teacher.cache_hits,
            "misses": rig.teacher.cache_misses,
            "distinct_phrases": len(rig.phrases),
        }
    return out


def _eval_figures(c: Config, flops: dict[str, float]) -> dict[str, Any]:
    """Evaluation figures of one path."""
    return {
        "images_per_s": c.images_per_s,
        "repeats": c.rates,
        "peak_memory_mb": c.peak_mb,
        "tflops": c.images_per_s * flops["eval_per_image"] / 1e12,
    }


def _train_figures(
    by_name: dict[str, Config], path: str, flops: dict[str, float], full: str
) -> dict[str, Any]:
    """Training figures of one path: student alone, with the teacher, on cached tokens."""
    alone = by_name[f"{path} train"]
    out: dict[str, Any] = {
        "images_per_s": alone.images_per_s,
        "repeats": alone.rates,
        "peak_memory_mb": alone.peak_mb,
        "tflops": alone.images_per_s * flops["train_per_image"] / 1e12,
    }
    both = by_name.get(f"{path} train+teacher")
    if both is not None:
        per_image = flops["train_per_image"] + flops["teacher_image_per_image"]
        out.update(
            {
                "images_per_s_with_teacher": both.images_per_s,
                "repeats_with_teacher": both.rates,
                "peak_memory_mb_with_teacher": both.peak_mb,
                # Extra time per step that the teacher costs, in % of the student-only step.
                "teacher_overhead_pct": 100.0 * (paired_ratio(alone, both) - 1.0),
                "tflops_with_teacher": both.images_per_s * per_image / 1e12,
            }
        )
    cached = by_name.get(f"{path} train cached")
    if cached is not None:
        out.update(
            {
                "images_per_s_cached": cached.images_per_s,
                "repeats_cached": cached.rates,
                "peak_memory_mb_cached": cached.peak_mb,
                # The cached step against the full step it replaces, window by window.
                "cached_speedup": paired_ratio(cached, by_name[f"{path} {full}"]),
            }
        )
    return out
