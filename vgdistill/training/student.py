"""Training on HF Accelerate: one code path for one CPU, one GPU, many GPUs and many machines.

What makes a run resumable bit for bit (on the CPU, same seed and process count):
- the data order of each epoch is a function of (seed, epoch) only: Accelerate's seedable
  sampler reseeds itself from `data_seed + epoch` at the start of every epoch;
- each sample's augmentation is a function of (seed, epoch, row) only (`SeededDataset`),
  and fetching data never moves the RNG that dropout draws from;
- `state/step-N` (Accelerate `save_state`) holds model, optimiser, scheduler, the RNG of
  every process and `RunState` (epoch, batches done, step, best score); a resume loads it
  and skips the batches of the epoch that were already seen (`skip_first_batches`).
Saves happen only at optimiser-step boundaries, after checking that no loss since the last
check was NaN/inf, so a checkpoint never holds weights that saw a non-finite loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgdistill.atomic import exclusive, write_text
from vgdistill.data.loader import SeededDataset
from vgdistill.errors import NonFiniteLossError, VGError
from vgdistill.losses.distillation import DistillationTask
from vgdistill.recipe import Recipe, load_recipe, to_toml
from vgdistill.training.metrics import MetricsLog, read_metrics

log = logging.getLogger("vgdistill")

# Recipe keys that may change between a run and its --resume: they do not change the
# weights the run produces (checkpoint cadence, logging, loader workers, eval batch size).
RESUMABLE_KEYS = frozenset(
    {
        "train.log_every",
        "train.save_every",
        "train.keep",
        "train.trackers",
        "data.num_workers",
        "eval.batch_size",
        "eval.splits",
    }
)
SUMMARY_NAME = "train_summary.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RecipeMismatch(VGError):
    """A resume refused because the run folder was trained with another recipe."""

    def __init__(self, message: str, keys: str) -> None:
        super().__init__(message)
        self.keys = keys  # the differing recipe keys, as the message shows them


class TrainInterrupted(VGError):
    """Training stopped on request (Ctrl-C / SIGTERM) after saving a resumable state."""

    exit_code = 130


@dataclass
class RunState:
    """Where a run stands; saved inside every resumable checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already consumed by each process
    step: int = 0  # optimiser steps done
    best_acc50: float = -1.0
    best_step: int = -1
    evaluated_step: int = -1  # step of the last validation, to avoid evaluating twice
    last_step: int = -1  # step at which last/ was written
    finished: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Plain dict for Accelerate's checkpointing."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        for key, value in state.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------- run folder


def state_dirs(out_dir: str | Path) -> list[Path]:
    """Complete resumable states of a run, oldest first (partial saves are dot-folders)."""
    root = Path(out_dir) / "state"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _discard(folder: Path) -> None:
    """Delete a state folder by renaming it to a dot-name first: a kill during the delete
    leaves a folder that no resume reads, never a torn step-N."""
    trash = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_summary(out_dir: str | Path) -> dict[str, Any] | None:
    """The run's train_summary.json (written when training finished), or None."""
    path = Path(out_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _recipe_changes(old: Recipe, new: Recipe) -> list[str]:
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS)


def _check_trackers(names: list[str]) -> None:
    from accelerate.utils import LoggerType

    valid = {t.value for t in LoggerType}
    for name in names:
        if name not in valid:
            raise VGError(
                f"train.trackers: unknown tracker {name!r}; valid: {', '.join(sorted(valid))}"
            )
        if name == "tensorboard":
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                raise VGError(
                    "train.trackers has 'tensorboard' but it is not installed: "
                    "pip install tensorboard (or remove it from train.trackers)"
                )


@contextlib.contextmanager
def _stop_signals(on_signal: Any) -> Iterator[None]:
    """Turn the first Ctrl-C / SIGTERM into a request to stop at the next step boundary.

    A second Ctrl-C interrupts at once. Outside the main thread signals cannot be caught,
    and training then simply runs without this.
    """
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if on_signal():
            # Second request: the user really wants out now.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- trainer


class Trainer:
    """One training run in one run folder; `run()` trains (or resumes) to the end."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | Path,
        *,
        resume: bool = False,
        stop_at_step: int | None = None,
        show_progress: bool = True,
        command_hint: str | None = None,
    ) -> None:
        self.recipe = recipe
        self.out = Path(out_dir)
        self.resume = resume
        self.stop_at_step = stop_at_step
        self.show_progress = show_progress
        self.command_hint = command_hint
        self.state = RunState()
        self._stop_requested = False

    # -- setup ----------------------------------------------------------------------------

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

        from vgdistill.device import multiprocess_cpu

        t = self.recipe.train
        if t.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise VGError(
                "train.mixed_precision = 'fp16' needs a GPU; use 'bf16' or 'no' on the CPU"
            )
        _check_trackers(t.trackers)
        return Accelerator(
            mixed_precision=t.mixed_precision,
            cpu=multiprocess_cpu(),
            gradient_accumulation_steps=t.grad_accum,
            log_with=list(t.trackers) or None,
            # Trackers write under runs/NAME/logs/ (TensorBoard: tensorboard --logdir runs).
            project_dir=str(self.out),
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True,
                data_seed=t.seed,
                non_blocking=torch.cuda.is_available(),
            ),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )

    def _check_folder(self) -> None:
        """Refuse to overwrite a run without --resume, or to resume it with another recipe."""
        recipe_file = self.out / "recipe.toml"
        # A start that failed before training (e.g. a missing weight file) leaves only
        # recipe.toml behind: nothing to lose, so the same command may simply run again.
        started = self.out.is_dir() and any(p.name != "recipe.toml" for p in self.out.iterdir())
        existing = started or bool(state_dirs(self.out))
        if existing and not self.resume:
            raise VGError(
                f"{self.out} already holds a run; add --resume to continue it, "
                "or choose another --out"
            )
        if existing and recipe_file.exists():
            try:
                old = load_recipe(recipe_file)
            except VGError as e:
                raise VGError(f"cannot resume: {e}") from None
            changed = _recipe_changes(old, self.recipe)
            if changed:
                shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
                raise RecipeMismatch(
                    f"cannot resume {self.out}: the recipe differs from its recipe.toml in "
                    f"{shown}; use the same recipe and --set options, or another --out",
                    shown,
                )

    def _build(self) -> None:
        """Data, model, teacher, optimiser, schedule; prepared by Accelerate."""
        from accelerate.utils import set_seed

        from vgdistill.data.loader import build_loader
        from vgdistill.device import set_cuda_speed_flags
        from vgdistill.evaluation.evaluate import load_splits
        from vgdistill.models.factory import build_model, build_tokenizer
        from vgdistill.training.optim import build_optimizer, build_scheduler

        r, acc = self.recipe, self.acc
        t = r.train
        device = acc.device
        set_cuda_speed_flags(device)

        splits = [r.data.train_split, r.data.val_split]
        with acc.main_process_first():
            self.data = load_splits(r.data.path, splits)
        self.tokenizer = build_tokenizer(r.model)

        # Same seed on every process for the initial weights (DDP also broadcasts them).
        set_seed(t.seed)
        student = build_model(r, load_weights=True)
        teacher = None
        if r.distill.modality != "none":
            from vgdistill.models.teacher import Teacher

            # Frozen (the paper), the Teacher keeps itself in eval mode without gradients.
            teacher = Teacher.from_config(r.distill).to(device)
            self._prewarm_text_cache(teacher)
        if t.compile:
            # Fixed shapes: one static graph per batch shape (the short last batch of an epoch
            # gets its own) instead of a dynamic-shape graph replacing the static one.
            student.compile(dynamic=False)
        trainable = teacher if teacher is not None and r.distill.teacher_trainable else None
        # The frozen teacher stays outside the prepared module and is passed to each step.
        self.frozen_teacher = None if trainable is not None else teacher
        self.module = DistillationTask(student, r.distill, trainable)
        groups = student.param_groups(t)
        if teacher is not None and r.distill.teacher_trainable:
            groups += teacher.param_groups(r.distill.teacher_lr, t.weight_decay)
        optimizer = build_optimizer(groups, t, device.type)
        # Dropout and augmentation draw different numbers on each process from here on.
        set_seed(t.seed, device_specific=True)

        loader = build_loader(
            self.data[r.data.train_split],
            self.tokenizer,
            r.data,
            t.batch_size,
            train=True,
            seed=t.seed,
        )
        rows = self._cached_rows(loader.dataset, student, teacher)
        loader = self._seeded_loader(loader, rows)
        self.module, self.optimizer, self.loader = acc.prepare(self.module, optimizer, loader)

        per_epoch = math.ceil(len(self.loader) / t.grad_accum)
        if per_epoch == 0:
            raise VGError(
                f"the {r.data.train_split!r} split is smaller than one batch per process; "
                "lower train.batch_size or use fewer processes"
            )
        self.steps_per_epoch = per_epoch
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * per_epoch
        self.n_epochs = math.ceil(self.total_steps / per_epoch)
        # The scheduler is stepped by us once per optimiser step (not prepared: a prepared
        # scheduler steps once per process), and saved with the state.
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps, per_epoch)
        acc.register_for_checkpointing(self.scheduler, self.state)

    def _prewarm_text_cache(self, teacher: Any) -> None:
        """Embed every training phrase once, in a fixed order and fixed chunks, up front.

        A CLIP text embedding can differ in its last bits with the batch it was computed in;
        filling the frozen teacher's per-phrase cache this way makes the targets independent
        of batch composition (so a resumed run matches an uninterrupted one bit for bit), and
        takes the text tower out of the training step altogether.
        """
        r = self.recipe
        if r.distill.teacher_trainable or r.distill.modality not in ("both", "text"):
            return
        phrases = set(self.data[r.data.train_split]["expression"])
        if r.data.augment:
            from vgdistill.data.transforms import swap_left_right

            phrases |= {swap_left_right(p) for p in phrases}
        ordered = sorted(phrases)
        if len(ordered) > getattr(teacher, "cache_size", len(ordered)):
            return  # would not fit: the cache fills lazily instead
        chunk = 256
        for i in range(0, len(ordered), chunk):
            teacher.encode(None, ordered[i : i + chunk], want_image=False, want_text=True)

    def _cached_rows(self, dataset: Any, student: nn.Module, teacher: Any) -> Any:
        """The training rows over cached visual tokens, or None to train from pixels."""
        from vgdistill.training.visual_cache import build_cached_rows, cache_blocker

        r = self.recipe
        why_not = cache_blocker(r)
        if why_not is not None:
            log.debug("visual tokens not cached: %s", why_not)
            return None
        with self.acc.autocast():
            return build_cached_rows(
                r,
                dataset,
                student.to(self.acc.device),
                teacher if r.distill.modality in ("both", "image") else None,
                self.acc,
                show_progress=self.show_progress and self.acc.is_local_main_process,
            )

    def _seeded_loader(self, loader: Any, cached: Any = None) -> Any:
        """The loader rebuilt over `SeededDataset` (or over `cached` rows), with its own generator.

        Its own generator keeps the iterator's start (which draws a worker base seed) from
        consuming the global RNG; workers are not persistent so each epoch's seed reaches them.
        Cached rows come whole batches at a time, in the main process.
        """
        from torch.utils.data import DataLoader, RandomSampler

        from vgdistill.training.visual_cache import whole_batch

        if cached is None:
            self.seeded = SeededDataset(loader.dataset, self.recipe.train.seed)
        else:
            self.seeded = cached
        kwargs: dict[str, Any] = {
            "batch_size": loader.batch_size,
            "shuffle": isinstance(loader.sampler, RandomSampler),
            "collate_fn": loader.collate_fn if cached is None else whole_batch,
            "num_workers": loader.num_workers if cached is None else 0,
            "pin_memory": loader.pin_memory,
            "drop_last": loader.drop_last,
            "generator": torch.Generator().manual_seed(self.recipe.train.seed),
        }
        if kwargs["num_workers"] > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
            kwargs["worker_init_fn"] = loader.worker_init_fn
        return DataLoader(self.seeded, **kwargs)

    # -- checkpoints ------------------------------------------------------------------------

    @property
    def student(self) -> nn.Module:
        """The bare student (no DDP wrapper)."""
        return self.acc.unwrap_model(self.module).student

    def _save_model(self, name: str) -> Path:
        from vgdistill.models.checkpoint import save_checkpoint

        target = self.out / name
        if self.acc.is_main_process:
            save_checkpoint(self.student, self.recipe, target)
        self.acc.wait_for_everyone()
        return target

    def _save_last(self) -> None:
        self.state.last_step = self.state.step
        self._save_model("last")

    def _save_state(self) -> Path:
        """Accelerate state into state/step-N, built under a dot-name and renamed when complete."""
        acc = self.acc
        root = self.out / "state"
        final = root / f"step-{self.state.step}"
        partial = root / f".step-{self.state.step}.partial"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                _discard(final)
            os.replace(partial, final)
            for old in state_dirs(self.out)[: -self.recipe.train.keep]:
                _discard(old)
        acc.wait_for_everyone()
        return final

    def _load_latest(self) -> bool:
        """Load the newest resumable state, if any; True when one was loaded."""
        found = state_dirs(self.out)
        if not found:
            return False
        latest = found[-1]
        try:
            self.acc.load_state(str(latest))
        except Exception as e:  # a torn or foreign folder: say which one and what to do
            raise VGError(
                f"cannot resume from {latest}: {type(e).__name__}: {e}; delete that folder to "
                "resume from an older state"
            ) from None
        return True

    # -- the loop ---------------------------------------------------------------------------

    def _request_stop(self) -> bool:
        """Signal handler hook: True if a stop had already been requested."""
        already = self._stop_requested
        self._stop_requested = True
        return already

    def _sync_buffers(self) -> None:
        """Give every process the main process's buffers (BatchNorm running statistics).

        DDP copies them from process 0 at the start of each forward, so after the last step
        each process holds its own; evaluation must use the ones that are saved.
        """
        if self.acc.num_processes == 1:
            return
        import torch.distributed as dist

        for buf in self.acc.unwrap_model(self.module).buffers():
            dist.broadcast(buf.data, src=0)

    def _eval(self) -> dict[str, Any]:
        from vgdistill.evaluation.evaluate import evaluate

        r = self.recipe
        split = r.data.val_split
        self._sync_buffers()
        res = evaluate(
            self.student,
            r,
            [split],
            accelerator=self.acc,
            dataset=self.data,
            tokenizer=self.tokenizer,
        )[split]
        self.state.evaluated_step = self.state.step
        epoch = self.state.step / self.steps_per_epoch
        self.metrics.write(
            {
                "type": "eval",
                "epoch": round(epoch, 4),
                "step": self.state.step,
                "split": split,
                **{k: res[k] for k in ("acc50", "acc75", "miou", "count")},
            }
        )
        self.acc.log(
            {f"{split}/acc50": res["acc50"], f"{split}/miou": res["miou"]}, step=self.state.step
        )
        improved = res["acc50"] > self.state.best_acc50
        if improved:
            self.state.best_acc50 = res["acc50"]
            self.state.best_step = self.state.step
            self._save_model("best")
        if self.acc.is_main_process:
            log.info(
                "step %d: %s Acc@0.5 %.2f  Acc@0.75 %.2f  mIoU %.2f  (n=%d)%s",
                self.state.step,
                split,
                100 * res["acc50"],
                100 * res["acc75"],
                100 * res["miou"],
                res["count"],
                "  new best" if improved else "",
            )
        self.last_eval = res
        return res

    def _sync(self, window: dict[str, Any]) -> dict[str, float]:
        """All-reduce the logging window and the stop/NaN flags (one collective call)."""
        names = window["names"]
        local = torch.stack(
            [window["loss"], *[window["parts"][n] for n in names]]
            + [
                torch.tensor(float(window["micro"]), device=self.acc.device),
                torch.tensor(float(window["images"]), device=self.acc.device),
                window["bad"],
                torch.tensor(float(self._stop_requested), device=self.acc.device),
            ]
        ).float()
        total = self.acc.reduce(local, "sum").cpu().tolist()
        k = len(names)
        micro = max(total[k + 1], 1.0)
        out = {"loss": total[0] / micro, **{n: total[1 + i] / micro for i, n in enumerate(names)}}
        out["_images"], out["_bad"], out["_stop"] = total[k + 2], total[k + 3], total[k + 4]
        return out

    def _nonfinite(self, first_step: int) -> NonFiniteLossError:
        last = self.out / "last"
        where = f"{last} (step {self.state.last_step})" if last.exists() else "none yet"
        when = (
            f"at step {first_step}"
            if first_step >= self.state.step
            else f"between steps {first_step} and {self.state.step}"
        )
        return NonFiniteLossError(
            f"the loss became NaN or infinite {when}; "
            "lower train.lr, set train.clip_grad (e.g. 0.1) or check the data. Nothing was "
            f"saved after it; last good checkpoint: {where}"
        )

    def run(self) -> dict[str, Any]:
        """Train to the end (or resume); returns the run summary."""
        self.acc = self._make_accelerator()
        acc = self.acc
        self.last_eval: dict[str, Any] | None = None

        with contextlib.ExitStack() as stack:
            if acc.is_main_process:  # one writer per run folder
                stack.enter_context(exclusive(self.out, "another training process"))
            self._check_folder()
            summary = read_summary(self.out) if self.resume else None
            acc.wait_for_everyone()  # every process has looked before anything is written
            if summary and summary.get("finished"):
                if acc.is_main_process:
                    log.info("%s: already finished (step %s)", self.out, summary.get("step"))
                return summary
            if acc.is_main_process:
                self.out.mkdir(parents=True, exist_ok=True)
                write_text(self.out / "recipe.toml", to_toml(self.recipe))
            acc.wait_for_everyone()
            return self._run()

    def _run(self) -> dict[str, Any]:
        acc, r = self.acc, self.recipe
        t = r.train
        self._build()
        resumed = self.resume and self._load_latest()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", acc.is_main_process)
        if self.resume:
            self.metrics.truncate_after(self.state.step if resumed else -1)
        if t.trackers:
            acc.init_trackers("logs", config=_tracker_config(r))
        if acc.is_main_process:
            how = f"resuming at step {self.state.step}" if resumed else "starting"
            log.info(
                "%s: %s; %d steps (%d per epoch), %d process(es), device %s, precision %s",
                self.out,
                how,
                self.total_steps,
                self.steps_per_epoch,
                acc.num_processes,
                acc.device,
                t.mixed_precision,
            )
        with _stop_signals(self._request_stop):
            self._loop()
            return self._finish()

    def _loop(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        acc, r, st = self.acc, self.recipe, self.state
        t = r.train
        single = acc.num_processes == 1
        progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not (self.show_progress and acc.is_local_main_process),
        )
        task = progress.add_task(
            "train",
            total=self.total_steps,
            completed=st.step,
            epoch=f"{st.epoch + 1}/{self.n_epochs}",
            info="",
        )
        self.run_images = 0.0
        self.run_seconds = 0.0
        window = self._new_window()
        check_from = st.step + 1
        with progress:
            while st.step < self.total_steps and st.epoch < self.n_epochs:
                epoch = st.epoch
                self.loader.set_epoch(epoch)
                self.seeded.set_epoch(epoch)
                loader = self.loader
                if st.batch:
                    loader = acc.skip_first_batches(self.loader, st.batch)
                n_batches = len(self.loader)
                progress.update(task, epoch=f"{epoch + 1}/{self.n_epochs}")
                self.module.train()
                try:
                    for i, batch in enumerate(loader, start=st.batch):
                        with acc.accumulate(self.module):
                            loss, parts = self.module(batch, self.frozen_teacher)
                            acc.backward(loss)
                            if acc.sync_gradients and t.clip_grad > 0:
                                acc.clip_grad_norm_(self.module.parameters(), t.clip_grad)
                            self.optimizer.step()
                            self.optimizer.zero_grad(set_to_none=True)
                        self._accumulate(window, loss, parts, batch)
                        if not acc.sync_gradients:
                            continue
                        self._lr_used = max(g["lr"] for g in self.optimizer.param_groups)
                        self.scheduler.step()
                        st.step += 1
                        st.batch = i + 1
                        progress.advance(task)
                        end_of_epoch = st.batch >= n_batches
                        save_due = bool(t.save_every) and st.step % t.save_every == 0
                        done = st.step >= self.total_steps
                        sync = (
                            st.step % t.log_every == 0
                            or save_due
                            or end_of_epoch
                            or done
                            or st.step == self.stop_at_step
                            or (single and self._stop_requested)
                        )
                        if not sync:
                            continue
                        if st.step == self.stop_at_step:
                            self._stop_requested = True
                        info = self._sync(window)
                        if info["_bad"] > 0:
                            raise self._nonfinite(check_from)
                        check_from = st.step + 1
                        self._log(window, info, progress, task)
                        window = self._new_window()
                        if info["_stop"] > 0:
                            self._interrupt()
                        if done:
                            break
                        if save_due and not end_of_epoch:
                            self._save_last()
                            self._save_state()
                            window["start"] = time.perf_counter()  # images/s counts training only
                finally:
                    # A loop left early (max_steps, stop, NaN) must not stay Accelerate's
                    # active loader: later loops (evaluation, another run) consult it.
                    loader.end()
                if st.step >= self.total_steps and st.batch < n_batches:
                    break  # max_steps reached inside the epoch
                # End of the epoch: validate, keep last/, and save where the next epoch starts.
                st.epoch += 1
                st.batch = 0
                last_epoch = st.epoch >= self.n_epochs or st.step >= self.total_steps
                if st.epoch % t.eval_every == 0 or last_epoch:
                    self._eval()
                if not last_epoch:
                    self._save_last()
                    self._save_state()
                window["start"] = time.perf_counter()

    def _new_window(self) -> dict[str, Any]:
        return {
            "loss": torch.zeros((), device=self.acc.device),
            "parts": {},
            "names": [],
            "micro": 0,
            "images": 0,
            "bad": torch.zeros((), device=self.acc.device),
            "start": time.perf_counter(),
        }

    def _accumulate(
        self,
        window: dict[str, Any],
        loss: torch.Tensor,
        parts: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> None:
        """Add one micro-batch to the logging window without a device sync."""
        loss = loss.detach().float()
        window["bad"] = window["bad"] + (~torch.isfinite(loss)).float()
        window["loss"] = window["loss"] + loss
        if not window["names"]:
            window["names"] = sorted(parts)
            window["parts"] = {n: torch.zeros((), device=self.acc.device) for n in window["names"]}
        for n in window["names"]:
            window["parts"][n] = window["parts"][n] + parts[n].detach().float()
        window["micro"] += 1
        window["images"] += int(batch["input_ids"].shape[0])

    def _log(
        self, window: dict[str, Any], info: dict[str, float], progress: Any, task: Any
    ) -> None:
        st = self.state
        seconds = time.perf_counter() - window["start"]
        ips = info["_images"] / seconds if seconds > 0 else 0.0
        self.run_images += info["_images"]
        self.run_seconds += seconds
        lr = self._lr_used  # the lr of the step just taken (the schedule has moved on)
        parts = {k: v for k, v in info.items() if not k.startswith("_") and k != "loss"}
        record = {
            "type": "train",
            "step": st.step,
            "epoch": round(st.step / self.steps_per_epoch, 4),
            "loss": info["loss"],
            **parts,
            "lr": lr,
            "images_per_s": ips,
        }
        self.metrics.write(record)
        self.acc.log(
            {
                "train/loss": info["loss"],
                "train/lr": lr,
                "train/images_per_s": ips,
                **{f"train/{k}": v for k, v in parts.items()},
            },
            step=st.step,
        )
        short = {
            "loss_l1": "l1",
            "loss_giou": "giou",
            "loss_distill_img": "dv",
            "loss_distill_txt": "dl",
        }
        bits = " ".join(f"{short.get(k, k)} {v:.3f}" for k, v in parts.items())
        progress.update(task, info=f"loss {info['loss']:.4f} ({bits}) lr {lr:.2e} {ips:.0f} img/s")

    def _interrupt(self) -> None:
        """Save a resumable state at this step boundary and stop (exit code 130)."""
        saved = self._save_state()
        hint = self.command_hint or f"vgdistill train RECIPE --out {self.out} --resume"
        raise TrainInterrupted(
            f"interrupted at step {self.state.step}; resumable state saved in {saved}. "
            f"Continue with: {hint}"
        )

    def _finish(self) -> dict[str, Any]:
        from vgdistill.report.curves import plot_curves

        acc, st = self.acc, self.state
        if st.evaluated_step != st.step:
            self._eval()
        st.finished = True
        if st.last_step != st.step or not (self.out / "last").exists():
            self._save_last()
        self._save_state()
        summary = {
            "finished": True,
            "step": st.step,
            "epochs": round(st.step / self.steps_per_epoch, 4),
            "processes": acc.num_processes,
            "best": {"acc50": st.best_acc50, "step": st.best_step},
            "val": self.last_eval,
            "images_per_s": self.run_images / self.run_seconds if self.run_seconds else None,
        }
        if acc.is_main_process:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
            write_text(self.out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        acc.wait_for_everyone()
        # Not acc.end_training(): it also destroys the process group, and callers (eval after
        # train, ablate, a second run) keep using it in this process.
        for tracker in acc.trackers:
            tracker.finish()
        return summary


def _tracker_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe flattened to scalars (TensorBoard hparams accept no lists or dicts)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        for k, v in _flat(recipe.to_dict()).items()
    }


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
    show_progress: bool = True,
    command_hint: str | None = None,
) -> dict[str, Any]:
    """Train `recipe` into run folder `out_dir` (resuming it with resume=True); the summary.

    `stop_at_step` behaves like a Ctrl-C arriving at that step (save a resumable state, raise
    TrainInterrupted): tests and time-boxed callers use it. Every process must call this.
    """
    return Trainer(
        recipe,
        out_dir,
        resume=resume,
        stop_at_step=stop_at_step,
        show_progress=show_progress,
        command_hint=command_hint,
    ).run()


__all__ = [
    "RunState",
    "TrainInterrupted",
    "read_metrics",
    "read_summary",
    "state_dirs",
    "train",
]
