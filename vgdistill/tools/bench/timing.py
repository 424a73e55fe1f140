"""Timing for bench: synchronised windows, peak memory, the data pipeline and the
interleaved measurement of every configuration."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vgdistill.device import synchronize
from vgdistill.recipe import Recipe
from vgdistill.tools.bench.fastpath import FastPath
from vgdistill.tools.bench.synthetic import quiet, synthetic_prepared_split, to_device

if TYPE_CHECKING:
    from vgdistill.tools.bench import BenchOptions
    from vgdistill.tools.bench.rig import Rig


def device_name(device: torch.device) -> str:
    """The device in words: GPU model, or cores and torch threads on a CPU."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class PeakMemory:
    """Peak memory of a window: CUDA max_memory_allocated, or the process RSS peak on a CPU.

    Linux resets the RSS high-water mark (VmHWM) when "5" is written to /proc/self/clear_refs;
    where that is not allowed the figure is the peak since the process started.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda" or self._clear_refs()

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        """Start a new window."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def peak_mb(self) -> float:
        """Peak of the window in MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        # ru_maxrss is KiB on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 1024)

    @property
    def kind(self) -> str:
        """What the figure is."""
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        return "process RSS peak" + ("" if self.resettable else " (since start)")


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds that `steps` calls of `fn` take, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- data pipeline


def training_loader(split: Any, tokenizer: Any, recipe: Recipe, batch: int, workers: int) -> Any:
    """The loader training iterates: build_loader under per-sample seeds."""
    from vgdistill.data.loader import build_loader
    from vgdistill.training.student_data import seeded_loader

    loader = build_loader(
        split,
        tokenizer,
        recipe.data,
        batch,
        train=True,
        seed=recipe.train.seed,
        num_workers=workers,
    )
    return seeded_loader(loader, recipe.train.seed)[0]


def loader_rates(loader: Any, device: torch.device, skip: int, chunk: int, repeats: int) -> list:
    """Images/s of `repeats` windows of `chunk` batches after `skip` untimed ones."""
    it = iter(loader)
    for _ in range(skip):
        batch = next(it)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start, images = time.perf_counter(), 0
        for _ in range(chunk):
            batch = to_device(next(it), device)
            images += int(batch["input_ids"].shape[0])
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    del it
    return rates


def measure_data(
    recipe: Recipe, tokenizer: Any, batch: int, opts: BenchOptions, device: torch.device
) -> dict[str, Any]:
    """Data pipeline images/s with the recipe's workers, and with none (one CPU's worth)."""
    workers = recipe.data.num_workers
    # With W workers batches arrive in bursts of W and the first W*prefetch are made during
    # start-up: skip those and time windows of at least 2W batches.
    prefetch = 2
    skip = opts.warmup + workers * prefetch
    chunk = max(opts.steps, 2 * workers)
    single_chunk = max(2, min(opts.steps, 8))
    rows = batch * (skip + chunk * opts.repeats + 1)
    with tempfile.TemporaryDirectory(prefix="vgdistill-bench-") as tmp, quiet():
        split = synthetic_prepared_split(Path(tmp) / "train", rows, recipe.data.image_size, 0)
        loader = training_loader(split, tokenizer, recipe, batch, workers)
        rates = loader_rates(loader, device, skip, chunk, opts.repeats)
        del loader
        if workers:
            one = training_loader(split, tokenizer, recipe, batch, 0)
            one_rates = loader_rates(one, device, 1, single_chunk, opts.repeats)
        else:
            one_rates = rates
        del split
    return {
        "workers": workers,
        "images_per_s": statistics.median(rates),
        "images_per_s_one_process": statistics.median(one_rates),
        "repeats": rates,
        "augment": recipe.data.augment,
    }


# --------------------------------------------------------------------------- model steps


@dataclass
class Config:
    """One measured configuration: a FastPath and which step it times."""

    name: str
    fp: FastPath
    kind: str  # "train", "train+teacher", "train cached" or "eval"
    rates: list[float] = dataclasses.field(default_factory=list)
    peak_mb: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Median images/s over the timed windows."""
        return statistics.median(self.rates) if self.rates else 0.0


def paired_rates(a: list[float], b: list[float]) -> float:
    """Median over repeats of a's rate / b's in the same repeat.

    The windows of one repeat ran back to back, so a load change on a shared machine hits
    both and cancels in their ratio, which a ratio of two medians would not do.
    """
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def paired_ratio(a: Config, b: Config) -> float:
    """`paired_rates` of two configurations' images/s."""
    return paired_rates(a.rates, b.rates)


def _step_of(rig: Rig, kind: str) -> tuple[Callable[[], None], int]:
    """The step a configuration of `kind` times, and the images it processes."""
    if kind == "eval":
        return rig.eval_step, rig.eval_batch
    if kind == "train cached":
        teacher = rig.teacher is not None
        return (lambda: rig.train_step(teacher, cached=True)), rig.batch
    teacher = kind == "train+teacher"
    return (lambda: rig.train_step(teacher)), rig.batch


def measure(
    rig: Rig, configs: list[Config], opts: BenchOptions, memory: PeakMemory, progress: Any
) -> None:
    """Time every configuration, interleaved window by window (repeat r of all, then r+1).

    Odd repeats run the configurations in reverse order (A B C, C B A, ...), so a steady
    drift in machine load does not favour the ones measured first.
    """
    for r in range(opts.repeats):
        for c in configs if r % 2 == 0 else configs[::-1]:
            rig.apply(c.fp)
            step, images = _step_of(rig, c.kind)
            # Full warm-up the first time; one step after each later switch (format changes,
            # optimiser state, cuDNN plans are then in place).
            for _ in range(opts.warmup if r == 0 else 1):
                step()
            memory.reset()
            seconds = timed(step, opts.steps, rig.device)
            c.peak_mb = max(c.peak_mb, memory.peak_mb())
            c.rates.append(opts.steps * images / seconds)
            progress(f"{c.name}: {c.rates[-1]:.1f} img/s (window {r + 1}/{opts.repeats})")
