"""What the student stage does between optimiser steps: its epochs' batches, log windows,
validation, checkpoints and stop requests (the fit loop's hooks for `Trainer`)."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from vgdistill.errors import NonFiniteLossError
from vgdistill.training.checkpoints import TrainInterrupted
from vgdistill.training.loop import FitLoop, Hooks
from vgdistill.training.window import Window

if TYPE_CHECKING:
    from vgdistill.training.student import Trainer

log = logging.getLogger("vgdistill")
# Short names of the loss parts on the progress bar.
SHORT_PARTS = {
    "loss_l1": "l1",
    "loss_giou": "giou",
    "loss_distill_img": "dv",
    "loss_distill_txt": "dl",
}


class StudentHooks(Hooks):
    """The student's side of the fit loop; reads and updates its `Trainer`."""

    def __init__(self, trainer: Trainer, progress: Any, task: Any, plain: bool = False) -> None:
        self.tr = trainer
        self.progress, self.task = progress, task
        # plain: log a line per window (a batch job's log file has no live bar).
        self.plain = plain
        self.started = time.perf_counter()  # for the ETA: the steps of this process so far
        self.start_step = trainer.state.step
        self.window = Window(trainer.acc.device)
        self.run_images = 0.0
        self.run_seconds = 0.0
        self.last_eval: dict[str, Any] | None = None

    def batches(self, epoch: int, skip: int) -> Iterable[Any]:
        """The epoch's batches after the first `skip` (already seen before a resume)."""
        tr = self.tr
        tr.loader.set_epoch(epoch)
        tr.seeded.set_epoch(epoch)
        self.progress.update(self.task, epoch=f"{epoch + 1}/{tr.n_epochs}")
        tr.module.train()
        return tr.acc.skip_first_batches(tr.loader, skip) if skip else tr.loader

    def on_batch(
        self, loop: FitLoop, batch: Any, loss: torch.Tensor, parts: dict[str, Any]
    ) -> None:
        """Add the micro-batch to the log window."""
        self.window.add(loss, parts, int(batch["input_ids"].shape[0]))

    def on_step(self, loop: FitLoop, loss: torch.Tensor, parts: dict[str, Any]) -> None:
        """At log, save, stop and end points: sync the window, check it, log, save or stop."""
        tr, st = self.tr, self.tr.state
        t = tr.recipe.train
        end_of_epoch = st.batch >= loop.epoch_size
        save_due = bool(t.save_every) and st.step % t.save_every == 0
        done = st.step >= tr.total_steps
        sync = (
            st.step % t.log_every == 0
            or save_due
            or end_of_epoch
            or done
            or st.step == tr.stop_at_step
            or (tr.acc.num_processes == 1 and loop.stop_requested)
        )
        if not sync:
            return
        if st.step == tr.stop_at_step:
            loop.request_stop()
        info = self.window.sync(tr.acc, loop.stop_requested)
        loop.check_finite(info["_bad"])
        self._log(loop, info)
        self.window = Window(tr.acc.device)
        if info["_stop"] > 0:
            self._interrupt()
        if save_due and not end_of_epoch and not done:
            tr.save_last()
            tr.checkpoints.save_state()
            self.window.start = time.perf_counter()  # images/s counts training only

    def on_epoch_end(self, loop: FitLoop) -> None:
        """Validate, keep last/, and save where the next epoch starts."""
        tr, st = self.tr, self.tr.state
        last_epoch = st.epoch >= tr.n_epochs or st.step >= tr.total_steps
        if st.epoch % tr.recipe.train.eval_every == 0 or last_epoch:
            self.evaluate()
        if not last_epoch:
            tr.save_last()
            tr.checkpoints.save_state()
        self.window.start = time.perf_counter()

    def nonfinite(self, first_step: int) -> NonFiniteLossError:
        """The error for a loss that became NaN/inf at or after `first_step`."""
        st, last = self.tr.state, self.tr.run_dir.last
        where = f"{last} (step {st.last_step})" if last.exists() else "none yet"
        when = (
            f"at step {first_step}"
            if first_step >= st.step
            else f"between steps {first_step} and {st.step}"
        )
        return NonFiniteLossError(
            f"the loss became NaN or infinite {when}; "
            "lower train.lr, set train.clip_grad (e.g. 0.1) or check the data. Nothing was "
            f"saved after it; last good checkpoint: {where}"
        )

    def _log(self, loop: FitLoop, info: dict[str, float]) -> None:
        tr, st = self.tr, self.tr.state
        seconds = time.perf_counter() - self.window.start
        ips = info["_images"] / seconds if seconds > 0 else 0.0
        self.run_images += info["_images"]
        self.run_seconds += seconds
        lr = loop.lr_used  # the lr of the step just taken (the schedule has moved on)
        parts = {k: v for k, v in info.items() if not k.startswith("_") and k != "loss"}
        record = {
            "type": "train",
            "step": st.step,
            "epoch": round(st.step / tr.steps_per_epoch, 4),
            "loss": info["loss"],
            **parts,
            "lr": lr,
            "images_per_s": ips,
        }
        tr.metrics.write(record)
        tr.acc.log(
            {
                "train/loss": info["loss"],
                "train/lr": lr,
                "train/images_per_s": ips,
                **{f"train/{k}": v for k, v in parts.items()},
            },
            step=st.step,
        )
        bits = " ".join(f"{SHORT_PARTS.get(k, k)} {v:.3f}" for k, v in parts.items())
        text = f"loss {info['loss']:.4f} ({bits}) lr {lr:.2e} {ips:.0f} img/s"
        self.progress.update(self.task, info=text)
        if self.plain:
            log.info(
                "step %d/%d epoch %.2f/%d %s ETA %s",
                st.step,
                tr.total_steps,
                record["epoch"],
                tr.n_epochs,
                text,
                self._eta(),
            )

    def _eta(self) -> str:
        """Time left at this process's pace so far (validation and saves included), h:mm:ss."""
        st, total = self.tr.state, self.tr.total_steps
        done = st.step - self.start_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self.started) / done * max(0, total - st.step)
        return str(datetime.timedelta(seconds=round(left)))

    def _interrupt(self) -> None:
        """Save a resumable state at this step boundary and stop (exit code 130)."""
        tr = self.tr
        saved = tr.checkpoints.save_state()
        hint = tr.command_hint or f"vgdistill train RECIPE --out {tr.out} --resume"
        raise TrainInterrupted(
            f"interrupted at step {tr.state.step}; resumable state saved in {saved}. "
            f"Continue with: {hint}"
        )

    def _sync_buffers(self) -> None:
        """Give every process the main process's buffers (BatchNorm running statistics).

        DDP copies them from process 0 at the start of each forward, so after the last step
        each process holds its own; evaluation must use the ones that are saved.
        """
        tr = self.tr
        if tr.acc.num_processes == 1:
            return
        import torch.distributed as dist

        for buf in tr.acc.unwrap_model(tr.module).buffers():
            dist.broadcast(buf.data, src=0)

    def evaluate(self) -> dict[str, Any]:
        """Validate the student; log it, and keep it in best/ when it is the best so far."""
        from vgdistill.evaluation.evaluate import evaluate

        tr, st = self.tr, self.tr.state
        split = tr.recipe.data.val_split
        self._sync_buffers()
        res = evaluate(
            tr.student,
            tr.recipe,
            [split],
            accelerator=tr.acc,
            dataset=tr.data,
            tokenizer=tr.tokenizer,
        )[split]
        st.evaluated_step = st.step
        tr.metrics.write(
            {
                "type": "eval",
                "epoch": round(st.step / tr.steps_per_epoch, 4),
                "step": st.step,
                "split": split,
                **{k: res[k] for k in ("acc50", "acc75", "miou", "count")},
            }
        )
        tr.acc.log({f"{split}/acc50": res["acc50"], f"{split}/miou": res["miou"]}, step=st.step)
        if tr.acc.is_main_process:  # a job's curves can be looked at while it runs
            from vgdistill.report.curves import plot_curves

            plot_curves(tr.run_dir.metrics, tr.run_dir.curves)
        improved = res["acc50"] > st.best_acc50
        if improved:
            st.best_acc50 = res["acc50"]
            st.best_step = st.step
            tr.checkpoints.save_model(tr.student, tr.run_dir.best)
        if tr.acc.is_main_process:
            log.info(
                "step %d: %s Acc@0.5 %.2f  Acc@0.75 %.2f  mIoU %.2f  (n=%d)%s",
                st.step,
                split,
                100 * res["acc50"],
                100 * res["acc75"],
                100 * res["miou"],
                res["count"],
                "  new best" if improved else "",
            )
        self.last_eval = res
        return res
