"""The fit loop that every training stage drives with its own step function.

A stage brings its batches (`batches(epoch, skip)`: one epoch's iterable, its first `skip`
batches left out), a step function (batch -> (loss, parts)), an optimiser and scheduler, and
`Hooks` for what happens between steps (logging windows, evaluation, checkpoints). The loop
owns the mechanics: Accelerate's accumulate / backward / clip when an Accelerator is given,
the optimiser and scheduler steps, the NaN/inf guard, the position (epoch, batch, step), the
progress bar and stop requests.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vgdistill.errors import NonFiniteLossError

StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, Any]]]
Batches = Callable[[int, int], Iterable[Any]]


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: Any = None,
    clip_grad: float = 0.0,
    params: Iterable[torch.Tensor] | None = None,
) -> None:
    """Backward `loss`, clip (when clip_grad > 0), step `optimizer` and zero its gradients.

    `scaler` is a torch.amp GradScaler for fp16; `params` are what clipping covers (default:
    the optimiser's parameters).
    """
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            _clip(optimizer, clip_grad, params)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad > 0:
            _clip(optimizer, clip_grad, params)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _clip(
    optimizer: torch.optim.Optimizer, max_norm: float, params: Iterable[torch.Tensor] | None
) -> None:
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def nonfinite_error(stage: str) -> Callable[[int], Exception]:
    """The error a stage raises when its loss first is NaN/inf at a step: lower the lr."""

    def error(step: int) -> Exception:
        return NonFiniteLossError(
            f"{stage} loss became NaN or infinite at step {step}; lower --lr"
        )

    return error


@dataclass
class Position:
    """Where a fit stands."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already consumed by each process
    step: int = 0  # optimiser steps done


# What asks a run to stop: Ctrl-C, a scheduler's SIGTERM, and SIGHUP (the terminal or the SSH
# session closed); SIGHUP does not exist on Windows.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[], bool]) -> Iterator[None]:
    """Turn the first Ctrl-C / SIGTERM / SIGHUP into a call of `on_signal` (a request to stop).

    When `on_signal` returns True (a stop was already requested), the signal interrupts at
    once. Outside the main thread signals cannot be caught, and the fit then simply runs
    without this.
    """
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if on_signal():
            # Second request: the user really wants out now.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Hooks:
    """What a stage does between steps; every method is a no-op unless overridden."""

    def on_batch(
        self, loop: FitLoop, batch: Any, loss: torch.Tensor, parts: dict[str, Any]
    ) -> None:
        """After each micro-batch's backward (several per step under accumulation)."""

    def on_step(self, loop: FitLoop, loss: torch.Tensor, parts: dict[str, Any]) -> None:
        """After each optimiser and scheduler step; `loss` is the step's last micro-batch's."""

    def on_epoch_end(self, loop: FitLoop) -> None:
        """After an epoch's last step; the position already points at the next epoch."""


class Callbacks(Hooks):
    """Hooks made of plain functions with the `Hooks` signatures (any may be left out)."""

    def __init__(
        self,
        *,
        on_step: Callable[[FitLoop, torch.Tensor, dict[str, Any]], None] | None = None,
        on_epoch_end: Callable[[FitLoop], None] | None = None,
    ) -> None:
        self._on_step, self._on_epoch_end = on_step, on_epoch_end

    def on_step(self, loop: FitLoop, loss: torch.Tensor, parts: dict[str, Any]) -> None:
        """Call the `on_step` function, if any."""
        if self._on_step is not None:
            self._on_step(loop, loss, parts)

    def on_epoch_end(self, loop: FitLoop) -> None:
        """Call the `on_epoch_end` function, if any."""
        if self._on_epoch_end is not None:
            self._on_epoch_end(loop)


@dataclass
class FitLoop:
    """One fit: run(batches, hooks) steps until max_steps or max_epochs (whichever first)."""

    step_fn: StepFn
    optimizer: torch.optim.Optimizer
    # Builds the error raised for a non-finite loss first seen at a step; it names the stage
    # and says to lower the lr.
    nonfinite: Callable[[int], Exception]
    scheduler: Any = None  # stepped once per optimiser step
    accelerator: Any = None  # when given: accumulate, backward and clip through Accelerate
    module: torch.nn.Module | None = None  # what Accelerate accumulates over and clipping covers
    clip_grad: float = 0.0
    after_step: Callable[[], None] | None = None  # e.g. a parameter clamp after each step
    # True: check each loss before its backward (one device sync per step). False: the stage
    # counts non-finite losses itself and calls check_finite at its own sync points.
    check_every_step: bool = False
    max_steps: int | None = None
    max_epochs: int | None = None
    position: Position = field(default_factory=Position)
    progress: Any = None  # a rich Progress and its task, advanced once per step
    task: Any = None
    stop_requested: bool = False
    lr_used: float = 0.0  # the largest group lr of the step just taken
    epoch_size: int = 0  # batches of the epoch in progress
    check_from: int = 1  # first step not yet covered by a finiteness check

    def request_stop(self) -> bool:
        """Ask the stage to stop at its next sync point; True if one was already asked for."""
        already = self.stop_requested
        self.stop_requested = True
        return already

    def check_finite(self, bad: float) -> None:
        """Raise the stage's error when `bad` (non-finite losses since the last check) > 0."""
        if bad > 0:
            raise self.nonfinite(self.check_from)
        self.check_from = self.position.step + 1

    def run(self, batches: Batches, hooks: Hooks | None = None) -> None:
        """Train from `position` to the end; `batches(epoch, skip)` gives each epoch's batches."""
        hooks = hooks or Hooks()
        pos = self.position
        self.check_from = pos.step + 1
        while self._more():
            epoch = batches(pos.epoch, pos.batch)
            self.epoch_size = pos.batch + len(epoch)  # type: ignore[arg-type]
            try:
                complete = self._epoch(epoch, hooks)
            finally:
                # A loop left early (max_steps, stop, NaN) must not stay Accelerate's active
                # loader: later loops (evaluation, another run) consult it.
                end = getattr(epoch, "end", None)
                if end is not None:
                    end()
            if not complete:
                return  # max_steps reached inside the epoch
            pos.epoch += 1
            pos.batch = 0
            hooks.on_epoch_end(self)

    def _more(self) -> bool:
        pos = self.position
        if self.max_steps is not None and pos.step >= self.max_steps:
            return False
        return self.max_epochs is None or pos.epoch < self.max_epochs

    def _epoch(self, batches: Iterable[Any], hooks: Hooks) -> bool:
        """One epoch's steps; False when max_steps stopped it before its last batch."""
        pos = self.position
        for i, batch in enumerate(batches, start=pos.batch):
            loss, parts, synced = self._micro_step(batch)
            hooks.on_batch(self, batch, loss, parts)
            if not synced:
                continue
            self.lr_used = max(g["lr"] for g in self.optimizer.param_groups)
            if self.scheduler is not None:
                self.scheduler.step()
            if self.after_step is not None:
                self.after_step()
            pos.step += 1
            pos.batch = i + 1
            if self.progress is not None:
                self.progress.advance(self.task)
            hooks.on_step(self, loss, parts)
            if self.max_steps is not None and pos.step >= self.max_steps:
                return pos.batch >= self.epoch_size
        return True

    def _micro_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any], bool]:
        """Forward and backward one batch; the optimiser steps when gradients sync."""
        acc = self.accelerator
        if acc is None:
            loss, parts = self.step_fn(batch)
            self._guard(loss)
            params = self.module.parameters() if self.module is not None else None
            optimizer_step(loss, self.optimizer, clip_grad=self.clip_grad, params=params)
            return loss, parts, True
        with acc.accumulate(self.module):
            loss, parts = self.step_fn(batch)
            self._guard(loss)
            acc.backward(loss)
            if acc.sync_gradients and self.clip_grad > 0:
                acc.clip_grad_norm_(self.module.parameters(), self.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, parts, acc.sync_gradients

    def _guard(self, loss: torch.Tensor) -> None:
        if self.check_every_step and not torch.isfinite(loss):
            raise self.nonfinite(self.position.step)
