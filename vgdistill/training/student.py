"""The student stage: train EpmVG (with its teacher) on HF Accelerate, one code path for one
CPU, one GPU, many GPUs and many machines.

What makes a run resumable bit for bit (on the CPU, same seed and process count):
- the data order of each epoch is a function of (seed, epoch) only: Accelerate's seedable
  sampler reseeds itself from `data_seed + epoch` at the start of every epoch;
- each sample's augmentation is a function of (seed, epoch, row) only (`SeededDataset`),
  and fetching data never moves the RNG that dropout draws from;
- each resumable state (Accelerate `save_state`) holds model, optimiser, scheduler, the RNG of
  every process and `RunState` (epoch, batches done, step, best score); a resume loads it
  and skips the batches of the epoch that were already seen (`skip_first_batches`).
Saves happen only at optimiser-step boundaries, after checking that no loss since the last
check was NaN/inf, so a checkpoint never holds weights that saw a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgdistill.atomic import exclusive, write_text
from vgdistill.errors import VGError
from vgdistill.losses.distillation import DistillationTask
from vgdistill.recipe import Recipe, to_toml
from vgdistill.recipe.checks import check_start_files
from vgdistill.training.checkpoints import (
    Checkpoints,
    RecipeMismatch,
    RunState,
    TrainInterrupted,
    check_folder,
)
from vgdistill.training.loop import FitLoop, stop_signals
from vgdistill.training.metrics import MetricsLog
from vgdistill.training.rundir import RunDir
from vgdistill.training.student_data import (
    cached_rows,
    prewarm_text_cache,
    seeded_loader,
    warn_large_batch,
)
from vgdistill.training.student_hooks import StudentHooks
from vgdistill.training.trackers import check_trackers, start_trackers

log = logging.getLogger("vgdistill")


class Trainer:
    """One training run in one run folder; `run()` trains (or resumes) to the end.

    It drives the fit loop with the distillation task as its step function and
    `StudentHooks` between steps (log windows, validation, checkpoints, stop requests).
    """

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
        self.run_dir = RunDir(self.out)
        self.resume = resume
        self.stop_at_step = stop_at_step
        self.show_progress = show_progress
        self.command_hint = command_hint
        self.state = RunState()

    # -- setup ----------------------------------------------------------------------------

    def _make_accelerator(self) -> Any:
        from accelerate.utils import (
            DataLoaderConfiguration,
            DistributedDataParallelKwargs,
            ProjectConfiguration,
        )

        from vgdistill.device import make_accelerator, resolve_precision

        t = self.recipe.train
        if t.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise VGError(
                "train.mixed_precision = 'fp16' needs a GPU; use 'bf16' or 'no' on the CPU"
            )
        check_trackers(t.trackers)
        self.precision, self.precision_why = resolve_precision(t.mixed_precision)
        return make_accelerator(
            self.precision,
            gradient_accumulation_steps=t.grad_accum,
            log_with=list(t.trackers) or None,
            # Trackers write under the run's logs/ (TensorBoard: tensorboard --logdir runs).
            project_config=ProjectConfiguration(
                project_dir=str(self.out), logging_dir=str(self.run_dir.logs)
            ),
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True,
                data_seed=t.seed,
                non_blocking=torch.cuda.is_available(),
            ),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )

    def _build(self) -> None:
        """Data, model, teacher, optimiser, schedule; prepared by Accelerate."""
        from accelerate.utils import set_seed

        from vgdistill.data.loader import build_loader
        from vgdistill.device import set_cuda_speed_flags
        from vgdistill.evaluation.evaluate import load_splits
        from vgdistill.models.factory import build_tokenizer
        from vgdistill.training.init_from import build_student
        from vgdistill.training.optim import build_optimizer, build_scheduler

        r, acc = self.recipe, self.acc
        t = r.train
        device = acc.device
        set_cuda_speed_flags(device)

        splits = [r.data.train_split, r.data.val_split]
        with acc.main_process_first():
            self.data = load_splits(r.data.path, splits)
        self.tokenizer = build_tokenizer(r.model)

        if acc.is_main_process:
            warn_large_batch(r, len(self.data[r.data.train_split]), acc.num_processes)
        # Same seed on every process for the initial weights (DDP also broadcasts them).
        set_seed(t.seed)
        student = build_student(r, log_counts=acc.is_main_process)
        teacher = None
        if r.distill.modality != "none":
            from vgdistill.models.teacher import Teacher

            # Frozen (the paper), the Teacher keeps itself in eval mode without gradients.
            teacher = Teacher.from_config(r.distill).to(device)
            prewarm_text_cache(teacher, r, self.data[r.data.train_split])
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
        show = self.show_progress and acc.is_local_main_process
        rows = cached_rows(r, loader.dataset, student, teacher, acc, show)
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
        self.checkpoints = Checkpoints(acc, self.run_dir, r, self.state)

    def _seeded_loader(self, loader: Any, cached: Any = None) -> Any:
        """`seeded_loader` over `loader` (or `cached` rows); keeps its dataset as `seeded`."""
        out, self.seeded = seeded_loader(loader, self.recipe.train.seed, cached)
        return out

    @property
    def student(self) -> nn.Module:
        """The bare student (no DDP wrapper)."""
        return self.acc.unwrap_model(self.module).student

    def save_last(self) -> None:
        """The current weights into last/."""
        self.checkpoints.save_last(self.student)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end (or resume); returns the run summary."""
        if not self.recipe.model.init_from:  # init_from replaces the DETR start
            check_start_files(self.recipe)  # a missing DETR start stops before anything is written
        self.acc = self._make_accelerator()
        acc = self.acc
        with contextlib.ExitStack() as stack:
            if acc.is_main_process:  # one writer per run folder
                state = (self.run_dir.state_root.name,)  # its killed saves' leftovers go too
                what = "another training process"
                stack.enter_context(exclusive(self.out, what, subfolders=state))
            check_folder(self.run_dir, self.recipe, self.resume)
            summary = self.run_dir.read_summary() if self.resume else None
            acc.wait_for_everyone()  # every process has looked before anything is written
            if summary and summary.get("finished"):
                if not self._continues(summary):
                    if acc.is_main_process:
                        log.info("%s: already finished (step %s)", self.out, summary.get("step"))
                    return summary
                if acc.is_main_process:  # it no longer describes the run
                    self.run_dir.summary.unlink(missing_ok=True)
            if acc.is_main_process:
                self.out.mkdir(parents=True, exist_ok=True)
                write_text(self.run_dir.recipe, to_toml(self.recipe))
            acc.wait_for_everyone()
            return self._run()

    def _continues(self, summary: dict[str, Any]) -> bool:
        """Whether a finished run's --resume trains on: the recipe asks for more steps."""
        t, done = self.recipe.train, int(summary.get("step") or 0)
        per_epoch = summary.get("steps_per_epoch")
        if not per_epoch and summary.get("epochs"):  # a summary written before it was kept
            per_epoch = round(done / summary["epochs"])
        wanted = t.max_steps if t.max_steps > 0 else t.epochs * int(per_epoch or 0)
        if wanted and wanted < done:
            raise VGError(
                f"{self.out} already trained {done} steps and the recipe asks for {wanted}; "
                "raise train.epochs (or train.max_steps) to continue it"
            )
        return wanted > done

    def _position(self, resumed: bool) -> str:
        """How this run starts, for the start line; checks a resumed run can reach its end."""
        st = self.state
        if not resumed:
            return "starting"
        if st.step > self.total_steps:
            raise VGError(
                f"{self.out} is at step {st.step} but the recipe asks for {self.total_steps} "
                "steps; raise train.epochs (or train.max_steps)"
            )
        if not st.finished:
            return f"resuming at step {st.step}"
        st.finished = False
        if self.recipe.train.scheduler in ("cosine", "poly") and self.acc.is_main_process:
            log.warning(
                "train.scheduler = %r now spans %d steps: from step %d the lr follows the "
                "longer schedule, above where the run ended",
                self.recipe.train.scheduler,
                self.total_steps,
                st.step,
            )
        return f"continuing the finished run from step {st.step}"

    def _run(self) -> dict[str, Any]:
        acc, r = self.acc, self.recipe
        t = r.train
        self._build()
        resumed = self.resume and self.checkpoints.load_latest()
        how = self._position(resumed)
        self.metrics = MetricsLog(self.run_dir.metrics, acc.is_main_process)
        if self.resume:
            self.metrics.truncate_after(self.state.step if resumed else -1)
        start_trackers(acc, r, self.out.resolve().name, self.run_dir.logs)
        if acc.is_main_process:
            log.info(
                "%s: %s; %d steps (%d per epoch), %d process(es), device %s, precision %s (%s)",
                self.out,
                how,
                self.total_steps,
                self.steps_per_epoch,
                acc.num_processes,
                acc.device,
                self.precision,
                self.precision_why,
            )
        progress = self._progress()
        task = progress.add_task(
            "train",
            total=self.total_steps,
            completed=self.state.step,
            epoch=f"{self.state.epoch + 1}/{self.n_epochs}",
            info="",
        )
        self.hooks = StudentHooks(self, progress, task, plain=self._plain_lines(progress))
        loop = FitLoop(
            lambda batch: self.module(batch, self.frozen_teacher),
            self.optimizer,
            self.hooks.nonfinite,
            scheduler=self.scheduler,
            accelerator=acc,
            module=self.module,
            clip_grad=t.clip_grad,
            max_steps=self.total_steps,
            max_epochs=self.n_epochs,
            position=self.state,
            progress=progress,
            task=task,
        )
        with stop_signals(loop.request_stop):
            with progress:
                loop.run(self.hooks.batches, self.hooks)
            return self._finish()

    def _progress(self) -> Any:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            # Not on a terminal (a batch job's log file), plain log lines replace the bar.
            disable=not (self.show_progress and self.acc.is_local_main_process)
            or not Console(stderr=True).is_interactive,
        )

    def _plain_lines(self, progress: Any) -> bool:
        """Whether the main process logs a plain line per window: when no live bar shows."""
        return self.acc.is_main_process and progress.disable

    def _finish(self) -> dict[str, Any]:
        from vgdistill.report.curves import plot_curves

        acc, st, run = self.acc, self.state, self.run_dir
        if st.evaluated_step != st.step:
            self.hooks.evaluate()
        st.finished = True
        if st.last_step != st.step or not run.last.exists():
            self.save_last()
        self.checkpoints.save_state()
        hooks = self.hooks
        summary = {
            "finished": True,
            "step": st.step,
            "epochs": round(st.step / self.steps_per_epoch, 4),
            "steps_per_epoch": self.steps_per_epoch,
            "processes": acc.num_processes,
            "best": {"acc50": st.best_acc50, "step": st.best_step},
            "val": hooks.last_eval,
            "images_per_s": hooks.run_images / hooks.run_seconds if hooks.run_seconds else None,
        }
        if acc.is_main_process:
            plot_curves(run.metrics, run.curves)
            write_text(run.summary, json.dumps(summary, indent=2) + "\n")
        acc.wait_for_everyone()
        # Not acc.end_training(): it also destroys the process group, and callers (eval after
        # train, ablate, a second run) keep using it in this process.
        for tracker in acc.trackers:
            tracker.finish()
        return summary


def train(recipe: Recipe, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Train `recipe` into run folder `out_dir` (resuming it with resume=True); the summary.

    `options` are `Trainer`'s: resume, stop_at_step (behaves like a Ctrl-C arriving at that
    step: save a resumable state, raise TrainInterrupted), show_progress, command_hint. Every
    process must call this.
    """
    return Trainer(recipe, out_dir, **options).run()


__all__ = [
    "RecipeMismatch",
    "RunState",
    "TrainInterrupted",
    "Trainer",
    "train",
]
