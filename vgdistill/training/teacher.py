"""Fit a CLIP teacher contrastively on the (image, phrase) pairs of a prepared dataset.

No pretrained CLIP can be installed offline, and distilling from a random teacher teaches
nothing, so `vgdistill teacher` learns one: open_clip's own model classes and `ClipLoss`, from
scratch or starting from local open_clip weights (for real users: domain adaptation of CLIP
before distillation). The result is a folder in open_clip's local-dir layout that both
`open_clip.create_model("local-dir:FOLDER")` and a recipe's `distill.teacher = "FOLDER"` load.

The pairs and their batches (at most one phrase per image): `data.pairs`; the retrieval
score: `evaluation.retrieval`; where the teacher comes from and how it is written:
`models.clip_source`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__
from vgdistill.atomic import build_dir, exclusive, write_text
from vgdistill.data.pairs import collate_pairs, distinct_batches, load_split_pairs
from vgdistill.errors import VGError
from vgdistill.evaluation.retrieval import evaluate_retrieval
from vgdistill.models.clip_source import (
    CONFIG_FILE,
    LOCAL_DIR,
    WEIGHTS_FILE,
    TeacherSource,
    clip_preprocess,
    is_model_name,
    resolve_source,
    write_local_dir,
)
from vgdistill.recipe.shipped import run_name
from vgdistill.training import fitted

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch
    from rich.console import Console

    from vgdistill.data.pairs import SplitPairs
    from vgdistill.recipe import Recipe, TeacherConfig

REPORT_FILE = "teacher.json"
FORMAT_VERSION = 1


def default_out(recipe: Recipe, recipe_path: str | Path) -> Path:
    """Where the teacher goes without --out: distill.teacher when it names a folder (so the
    recipe's training finds it), else runs/teacher-<recipe name>."""
    if not is_model_name(recipe.distill.teacher):
        return Path(recipe.distill.teacher)
    return Path("runs") / f"teacher-{run_name(recipe_path)}"


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings' scale and the logit scale (CLIP practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "logit_scale" in name or name.endswith(".bias")
        (no_decay if flat else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _settings_key(recipe: Recipe, source: TeacherSource) -> dict[str, Any]:
    """What must match for an existing teacher folder to be reused."""
    return {
        "source": source.arch,
        "weights": source.weights,
        "data_path": str(Path(recipe.data.path).resolve()),
        "train_split": recipe.data.train_split,
        "val_split": recipe.data.val_split,
        "image_size": recipe.data.image_size,
        "augment": recipe.data.augment,
        "augment_ops": recipe.data.augment_ops,
        "fit": {**dataclasses.asdict(recipe.teacher), "seed": recipe.train.seed},
    }


def open_clip_preprocess(model: torch.nn.Module) -> dict[str, Any]:
    """The teacher's input size (h, w), mean and std, from open_clip's preprocess config."""
    cfg = clip_preprocess(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {"size": list(size), "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def fit_teacher(
    recipe: Recipe,
    out: str | Path,
    init: str | None = None,
    force: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit (or reuse) a CLIP teacher on `recipe`'s data, as recipe.teacher (seeded by
    train.seed) says, and write it to `out`.

    Returns the teacher.json report plus "reused": {"metrics": {"before", "after"} (validation
    retrieval), "history" (per epoch), "settings", "data", "fit_s", "time_s", ...}. A complete
    `out` fitted with the same settings is reused unless `force`.
    """
    import torch
    from rich.console import Console

    from vgdistill.device import resolve_device
    from vgdistill.models.teacher import Teacher

    console = console or Console(stderr=True)
    out = Path(out)
    source = resolve_source(recipe, init)
    if source.arch.startswith(LOCAL_DIR) and Path(source.weights) == out.resolve():
        raise VGError(f"--init and --out are the same folder ({out}); write the teacher elsewhere")
    key = _settings_key(recipe, source)

    with exclusive(out, "another `vgdistill teacher`", whole=True):
        reused = fitted.reusable_report(
            out, REPORT_FILE, WEIGHTS_FILE, key, "teacher", force, marker=CONFIG_FILE
        )
        if reused is not None:
            return reused

        t0 = time.perf_counter()
        from vgdistill.data.prepare import load_split

        # both splits are read before any model is built: a bad dataset fails fast
        for split in (recipe.data.train_split, recipe.data.val_split):
            load_split(recipe.data.path, split)
        torch.manual_seed(recipe.train.seed)
        device = resolve_device()
        # trainable and in fp32: the fit's own autocast decides the GPU precision
        teacher = Teacher.from_source(source, trainable=True, precision="fp32").to(device)
        splits = {
            "train": load_split_pairs(recipe, recipe.data.train_split, recipe.data.augment),
            "val": load_split_pairs(recipe, recipe.data.val_split),
        }
        with build_dir(out) as tmp:
            report = _train(
                teacher,
                splits,
                device,
                recipe.teacher,
                recipe.train.seed,
                recipe.data.num_workers,
                tmp,
                console,
                progress,
            )
            report.update(
                format_version=FORMAT_VERSION,
                vgdistill_version=__version__,
                complete=True,
                teacher=source.describe(),
                settings=key,
                data=_data_report(recipe, splits),
                device=str(device),
                time_s=round(time.perf_counter() - t0, 2),
            )
            write_local_dir(teacher.clip, source.model_cfg, tmp)
            write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return {**report, "reused": False}


def _data_report(recipe: Recipe, splits: dict[str, SplitPairs]) -> dict[str, Any]:
    """What teacher.json says about the data the teacher was fitted on."""
    d = recipe.data
    return {
        "path": d.path,
        "train_split": d.train_split,
        "val_split": d.val_split,
        "train_rows": len(splits["train"].table.phrases),
        "train_images": len(splits["train"].table.first_row),
        "val_rows": len(splits["val"].table.phrases),
        "val_images": len(splits["val"].table.first_row),
    }


def _train(
    teacher: Any,
    splits: dict[str, SplitPairs],
    device: torch.device,
    settings: TeacherConfig,
    seed: int,
    num_workers: int,
    folder: Path,
    console: Console,
    show_progress: bool,
) -> dict[str, Any]:
    """The contrastive loop; appends one metrics.jsonl line per epoch into `folder`."""
    from vgdistill.training.loop import Callbacks, FitLoop, nonfinite_error
    from vgdistill.training.metrics import METRICS_FILE, MetricsLog
    from vgdistill.training.optim import adamw, warmup_cosine_scheduler

    model = teacher.clip
    table = splits["train"].table
    # one epoch's batches sizes the schedule (later epochs differ by at most a batch or two)
    rows, phrases = table.image_of_row, table.phrases
    first = distinct_batches(rows, phrases, settings.batch_size, random.Random(0))
    if not first:
        raise VGError("the training split has fewer than two usable (image, phrase) pairs")
    total = len(first) * settings.epochs
    opt = adamw(
        _param_groups(model, settings.weight_decay),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        device_type=device.type,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    epochs = _Epochs(
        teacher,
        splits,
        device,
        settings.batch_size,
        num_workers,
        random.Random(seed),
        opt,
        MetricsLog(folder / METRICS_FILE),
        show_progress,
    )
    before = epochs.after = evaluate_retrieval(
        teacher, splits["val"], device, num_workers=num_workers
    )
    teacher.train()
    epochs.t0 = time.perf_counter()
    title = "[bold]teacher[/] epoch {task.fields[epoch]}/" + str(settings.epochs)
    with fitted.fit_progress(title, console, show_progress) as epochs.bar:
        epochs.task = epochs.bar.add_task("fit", total=total, epoch=1, loss="-")
        loop = FitLoop(
            epochs.step,
            opt,
            nonfinite_error("teacher"),
            scheduler=warmup_cosine_scheduler(opt, settings.warmup_steps, total),
            module=model,
            clip_grad=settings.grad_clip,
            after_step=epochs.clamp_scale,
            check_every_step=True,
            max_epochs=settings.epochs,
            progress=epochs.bar,
            task=epochs.task,
        )
        hooks = Callbacks(on_step=epochs.on_step, on_epoch_end=epochs.on_epoch_end)
        loop.run(epochs.batches, hooks)
    teacher.eval()
    return {
        "metrics": {"before": before, "after": epochs.after},
        "history": epochs.history,
        "fit_s": round(time.perf_counter() - epochs.t0, 2),
        "steps": loop.position.step,
        "preprocess": open_clip_preprocess(model),
    }


@dataclasses.dataclass
class _Epochs:
    """The teacher fit's epochs: fresh distinct-image batches each epoch, the step losses,
    and one validation line per epoch (metrics.jsonl, history, console)."""

    teacher: Any
    splits: dict[str, SplitPairs]
    device: torch.device
    batch_size: int
    num_workers: int
    rng: random.Random
    optimizer: Any
    metrics: Any  # the fit's MetricsLog
    show_progress: bool
    bar: Any = None
    task: Any = None
    t0: float = 0.0
    after: dict[str, float] = dataclasses.field(default_factory=dict)  # latest validation
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)  # this epoch's
    pairs: list[list[int]] = dataclasses.field(default_factory=list)  # this epoch's batches
    loss_fn: Any = None

    def __post_init__(self) -> None:
        import open_clip

        self.loss_fn = open_clip.ClipLoss()

    def step(self, batch: tuple[torch.Tensor, list[str]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """CLIP's contrastive loss on one batch of (image, phrase) pairs."""
        from vgdistill.device import gpu_bf16_autocast

        images, texts = batch
        x = self.teacher.image_input(images.to(self.device, non_blocking=True))
        tokens = self.teacher.tokenizer(texts).to(self.device, non_blocking=True)
        with gpu_bf16_autocast(self.device):
            outs = self.teacher.clip(x, tokens)
            loss = self.loss_fn(outs["image_features"], outs["text_features"], outs["logit_scale"])
        return loss, {}

    def clamp_scale(self) -> None:
        """CLIP caps the learned inverse temperature at 100."""
        import torch

        with torch.no_grad():
            self.teacher.clip.logit_scale.clamp_(0, math.log(100.0))

    def batches(self, epoch: int, skip: int) -> Any:
        """A loader over this epoch's distinct-image batches."""
        from torch.utils.data import DataLoader

        table, frames = self.splits["train"].table, self.splits["train"].frames
        self.pairs = distinct_batches(table.image_of_row, table.phrases, self.batch_size, self.rng)
        self.losses = []
        return DataLoader(
            frames,
            batch_sampler=self.pairs,
            num_workers=0 if frames.cache is not None else self.num_workers,
            collate_fn=collate_pairs,
            pin_memory=self.device.type == "cuda",
        )

    def on_step(self, loop: Any, loss: torch.Tensor, parts: dict[str, Any]) -> None:
        """Keep the step's loss and show it."""
        self.losses.append(loss.item())
        epoch = loop.position.epoch + 1
        self.bar.update(self.task, epoch=epoch, loss=f"{self.losses[-1]:.3f}")

    def on_epoch_end(self, loop: Any) -> None:
        """Validate, and write the epoch's line."""
        val = self.splits["val"]
        after = evaluate_retrieval(self.teacher, val, self.device, num_workers=self.num_workers)
        self.after, epoch, model = after, loop.position.epoch, self.teacher.clip
        line = {
            "type": "teacher",
            "epoch": epoch,
            "step": loop.position.step,
            "train_loss": sum(self.losses) / max(1, len(self.losses)),
            "lr": self.optimizer.param_groups[0]["lr"],
            "logit_scale": float(model.logit_scale.exp().item()),
            "pairs": sum(len(b) for b in self.pairs),
            **{f"val_{k}": v for k, v in after.items()},
            "time_s": round(time.perf_counter() - self.t0, 2),
        }
        self.history.append(line)
        self.metrics.write(line)
        if self.show_progress:
            self.bar.console.print(
                f"epoch {epoch}: loss {line['train_loss']:.3f}  val R@1 "
                f"image->phrase {after['i2t_r1']:.3f}  phrase->image {after['t2i_r1']:.3f}",
                highlight=False,
            )
