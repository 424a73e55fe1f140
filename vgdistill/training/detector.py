"""Pretrain the student's visual branch as an object detector, TransVG's DETR start made local.

TransVG does not train its visual branch from scratch: backbone and encoder start from a DETR
detector trained on COCO, so the grounding stage begins with tokens that already say "a red
circle is here". No detector weights can be downloaded here, so `vgdistill detector` learns
one on the object boxes a prepared dataset carries (its `objects` column; `shapes` writes
every object of every image) and saves it under DETR's key names, which the recipe key
`model.detr_checkpoint` loads like a real DETR checkpoint.

The detector. Every visual token of the encoder output predicts, through one linear head,
whether it lies on an object, that object's category, and the object's box. A token "lies on"
an object when the centre of its grid cell is inside the box (or it is the cell holding the
box centre, so small objects get one); where boxes overlap, the smaller object owns the cell.
Marking every cell of an object, not only its centre, matters: the grounding model then finds
the object's category and box on whichever of its tokens it attends to (on shapes, val
Acc@0.5 after 500 grounding steps was 0.30 this way against 0.10 with centre cells only).
Loss: binary cross-entropy on objectness over all valid cells, plus cross-entropy on the
category and DETR's box terms (5 * L1 + 2 * GIoU on normalised boxes) over object cells. This
is a one-stage grid detector (YOLO-style), not DETR's set prediction: TransVG keeps only
DETR's backbone and encoder, and the grid loss trains exactly those parts, in seconds.

Reported on the validation split: the share of objects "found" (the token at the object's
centre says object, names the right category and boxes it with IoU >= 0.5) and the category
accuracy there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__
from vgdistill.atomic import build_dir, exclusive, write_text
from vgdistill.errors import NonFiniteLossError, VGError
from vgdistill.training import fitted

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch
    from rich.console import Console

    from vgdistill.models.visual import VisualBranch
    from vgdistill.recipe import Recipe

log = logging.getLogger("vgdistill")

WEIGHTS_FILE = "detr.safetensors"
REPORT_FILE = "detector.json"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 1
L1_WEIGHT, GIOU_WEIGHT = 5.0, 2.0  # DETR's box loss weights
EVAL_EVERY = 100  # steps between validation lines in metrics.jsonl


@dataclass
class DetectorSettings:
    """How the detector is trained; recorded in detector.json (equal settings are reused)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    seed: int = 13

    def validate(self) -> None:
        """Range checks with one-line messages naming the flag."""
        if self.steps <= 0:
            raise VGError(f"--steps must be > 0, got {self.steps}")
        if self.batch_size <= 0:
            raise VGError(f"--batch-size must be > 0, got {self.batch_size}")
        if not self.lr > 0:
            raise VGError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise VGError("weight decay and warm-up steps must be >= 0")


def default_out(recipe: Recipe, recipe_path: str | Path) -> Path:
    """Where the detector goes without --out: the folder of model.detr_checkpoint when that
    names this command's weights file (so the recipe's training finds it), else
    runs/detector-<recipe name>."""
    checkpoint = Path(recipe.model.detr_checkpoint)
    if recipe.model.detr_checkpoint and checkpoint.name == WEIGHTS_FILE:
        return checkpoint.parent
    return Path("runs") / f"detector-{Path(recipe_path).stem}"


# --------------------------------------------------------------------------- data


class DetectionImages:
    """The distinct images of a prepared split with their objects, as detector targets.

    Item k: (image [3,S,S], padding mask [S,S], objectness [G*G], category id [G*G] (-100 off
    objects), box [G*G,4] normalised cxcywh in the padded frame, centre [G*G] True on the cell
    that holds an object's box centre).
    """

    def __init__(
        self, split: Any, categories: list[str], image_size: int, grid: int, stride: int
    ) -> None:
        import datasets

        from vgdistill.data.transforms import GroundingTransform

        # Bytes in, pixels decoded by load_image, as the grounding loader does.
        split = split.cast_column("image", datasets.Image(decode=False))
        first: dict[str, int] = {}
        for row, image_id in enumerate(split["image_id"]):
            first.setdefault(image_id, row)
        self.rows = list(first.values())
        self.split = split
        self.index = {c: i for i, c in enumerate(categories)}
        self.grid, self.stride, self.size = grid, stride, image_size
        self.transform = GroundingTransform(image_size, augment=False)

        self.cache: list[torch.Tensor] | None = None  # every item's tensors, image as float16

    def __len__(self) -> int:
        return len(self.rows)

    def load_cache(self, num_workers: int) -> None:
        """Decode every image once (in worker processes) and keep its targets in memory, when
        the images fit in CACHE_LIMIT_BYTES: the fit revisits each image a few times."""
        import torch
        from torch.utils.data import DataLoader

        from vgdistill.training.teacher import CACHE_LIMIT_BYTES

        if len(self) * 3 * self.size * self.size * 2 > CACHE_LIMIT_BYTES:
            return
        batches = list(DataLoader(self, batch_size=256, num_workers=num_workers))
        self.cache = [torch.cat(parts) for parts in zip(*batches, strict=True)]
        self.cache[0] = self.cache[0].half()

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        import torch

        from vgdistill.data.images import load_row_image

        if self.cache is not None:
            image, *rest = (t[k] for t in self.cache)
            return (image.float(), *rest)

        row = self.split[self.rows[k]]
        out = self.transform(load_row_image(row, f"image {row['image_id']}"), None, "")
        g = self.grid
        obj = torch.zeros(g * g)
        cat = torch.full((g * g,), -100, dtype=torch.int64)
        box = torch.zeros(g * g, 4)
        centre = torch.zeros(g * g, dtype=torch.bool)
        objects = row["objects"]
        # Larger boxes first, so a smaller object overlapping them claims the shared cells.
        order = sorted(
            zip(objects["category"], objects["bbox"], strict=True),
            key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1]),
        )
        centres = (torch.arange(g, dtype=torch.float32) + 0.5) * self.stride
        for category, (x1, y1, x2, y2) in order:
            # Original pixels -> padded frame (the eval transform: one scale, then a shift).
            x1, x2 = (out.scale * v + out.pad[0] for v in (x1, x2))
            y1, y2 = (out.scale * v + out.pad[1] for v in (y1, y2))
            inside_x = (centres >= x1) & (centres <= x2)
            inside_y = (centres >= y1) & (centres <= y2)
            cells = (inside_y[:, None] & inside_x[None, :]).flatten()
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            own = _cell(cy, self.stride, g) * g + _cell(cx, self.stride, g)
            cells[own] = centre[own] = True
            obj[cells] = 1.0
            cat[cells] = self.index[category]
            box[cells] = torch.tensor([cx, cy, x2 - x1, y2 - y1]) / self.size
        return out.image, out.mask, obj, cat, box, centre


def _cell(v: float, stride: int, grid: int) -> int:
    return min(grid - 1, max(0, int(v // stride)))


def _objects_split(path: str, split: str) -> Any:
    """One split of a prepared dataset that carries object boxes (clear errors otherwise)."""
    from vgdistill.data.prepare import load_split

    ds = load_split(path, split)
    if "objects" not in ds.column_names or not any(
        len(o["category"]) for o in ds.select(range(min(len(ds), 100)))["objects"]
    ):
        raise VGError(
            f"{path} has no object boxes to train a detector on (source {ds[0]['source']}); "
            "`vgdistill prepare shapes` writes them"
        )
    return ds


# --------------------------------------------------------------------------- model


def build_visual(recipe: Recipe) -> VisualBranch:
    """The student's visual branch (backbone + input projection + DETR encoder) for `recipe`."""
    from vgdistill.models.backbones import Backbone
    from vgdistill.models.visual import VisualBranch

    m = recipe.model
    backbone = Backbone(m.backbone)
    if m.backbone_weights:
        backbone.load_weights(m.backbone_weights)
    return VisualBranch(backbone, m.hidden_dim, m.enc_layers, m.enc_heads, m.enc_ffn, m.dropout)


def visual_to_detr_state(visual: VisualBranch) -> dict[str, torch.Tensor]:
    """The branch's weights under DETR's key names (the inverse of the DETR import)."""
    from vgdistill.models.visual import DETR_PREFIXES

    back = {dst: src for src, dst in DETR_PREFIXES.items()}
    state = {}
    for key, value in visual.state_dict().items():
        for dst, src in back.items():
            if key.startswith(dst):
                state[src + key[len(dst) :]] = value.detach().cpu().contiguous()
                break
    return state


def _losses(
    out: torch.Tensor, obj: torch.Tensor, cat: torch.Tensor, box: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Grid detection loss (see the module docstring) and its parts."""
    import torch.nn.functional as F

    from vgdistill.models.boxes import cxcywh_to_xyxy, paired_generalized_box_iou

    l_obj = F.binary_cross_entropy_with_logits(out[..., 0][valid], obj[valid])
    on = obj.bool() & valid
    n_cls = out.shape[-1] - 5
    l_cls = F.cross_entropy(out[..., 1 : 1 + n_cls][on], cat[on])
    pred = out[..., 1 + n_cls :][on].sigmoid()
    l1 = (pred - box[on]).abs().sum(-1).mean()
    giou = (1 - paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(box[on]))).mean()
    total = l_obj + l_cls + L1_WEIGHT * l1 + GIOU_WEIGHT * giou
    parts = {"obj": l_obj.item(), "cls": l_cls.item(), "l1": l1.item(), "giou": giou.item()}
    return total, parts


def _valid_cells(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """[B,S,S] pixel padding mask -> [B,G*G] True on cells that hold image (as DETR resizes)."""
    import torch.nn.functional as F

    return ~F.interpolate(mask[None].float(), size=(grid, grid)).bool()[0].flatten(1)


def evaluate_detector(
    visual: VisualBranch, head: torch.nn.Module, loader: Any, device: torch.device
) -> dict[str, float]:
    """found@0.5 and category accuracy at each object's centre cell, over a loader's images."""
    import torch

    from vgdistill.models.boxes import cxcywh_to_xyxy, paired_box_iou

    was = visual.training
    visual.eval()
    found = right = total = 0
    with torch.no_grad():
        for image, mask, _, cat, box, on in loader:
            image, mask = image.to(device), mask.to(device)
            tokens, _, _ = visual(image, mask)
            out = head(tokens).float().cpu()
            n_cls = out.shape[-1] - 5
            is_obj = out[..., 0][on] > 0
            label_ok = out[..., 1 : 1 + n_cls][on].argmax(-1) == cat[on]
            pred = cxcywh_to_xyxy(out[..., 1 + n_cls :][on].sigmoid())
            iou_ok = paired_box_iou(pred, cxcywh_to_xyxy(box[on])) >= 0.5
            found += int((is_obj & label_ok & iou_ok).sum())
            right += int(label_ok.sum())
            total += int(on.sum())
    visual.train(was)
    return {
        "found50": found / max(1, total),
        "category_acc": right / max(1, total),
        "objects": total,
    }


# --------------------------------------------------------------------------- fitting


def _settings_key(recipe: Recipe, settings: DetectorSettings) -> dict[str, Any]:
    """What must match for an existing detector folder to be reused."""
    m = recipe.model
    return {
        "data_path": str(Path(recipe.data.path).resolve()),
        "train_split": recipe.data.train_split,
        "val_split": recipe.data.val_split,
        "image_size": recipe.data.image_size,
        "visual": {
            k: getattr(m, k)
            for k in ("backbone", "backbone_weights", "hidden_dim", "enc_layers", "enc_heads")
            + ("enc_ffn", "dropout")
        },
        "fit": dataclasses.asdict(settings),
    }


def fit_detector(
    recipe: Recipe,
    out: str | Path,
    settings: DetectorSettings | None = None,
    force: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) the grid detector on `recipe`'s data and write it to `out`.

    Returns the detector.json report plus "reused". A complete `out` trained with the same
    settings is reused unless `force`; the folder appears whole or not at all.
    """
    import torch
    from rich.console import Console

    console = console or Console(stderr=True)
    settings = settings or DetectorSettings(seed=recipe.train.seed)
    settings.validate()
    out = Path(out)
    key = _settings_key(recipe, settings)
    with exclusive(out, "another `vgdistill detector`"):
        reused = fitted.reusable_report(out, REPORT_FILE, WEIGHTS_FILE, key, "detector", force)
        if reused is not None:
            return reused

        t0 = time.perf_counter()
        train_ds = _objects_split(recipe.data.path, recipe.data.train_split)
        val_ds = _objects_split(recipe.data.path, recipe.data.val_split)
        # Validation objects of a category that training never shows count as misses.
        categories = sorted(
            {c for ds in (train_ds, val_ds) for o in ds["objects"] for c in o["category"]}
        )
        torch.manual_seed(settings.seed)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        visual = build_visual(recipe)
        grid = visual.backbone.feature_size(recipe.data.image_size)
        stride = visual.backbone.stride
        head = torch.nn.Linear(visual.dim, 1 + len(categories) + 4)
        visual.to(device)
        head.to(device)
        data = {
            name: DetectionImages(ds, categories, recipe.data.image_size, grid, stride)
            for name, ds in (("train", train_ds), ("val", val_ds))
        }
        for images in data.values():
            images.load_cache(recipe.data.num_workers)
        with build_dir(out) as tmp:
            report = _train(
                visual, head, data, grid, device, settings, recipe, tmp, console, progress
            )
            report.update(
                format_version=FORMAT_VERSION,
                vgdistill_version=__version__,
                complete=True,
                settings=key,
                categories=categories,
                grid=[grid, grid],
                data={
                    "path": recipe.data.path,
                    "train_images": len(data["train"]),
                    "val_images": len(data["val"]),
                },
                device=str(device),
                time_s=round(time.perf_counter() - t0, 2),
            )
            from safetensors.torch import save_file

            save_file(visual_to_detr_state(visual), str(tmp / WEIGHTS_FILE))
            write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return {**report, "reused": False}


def _train(
    visual: VisualBranch,
    head: torch.nn.Module,
    data: dict[str, DetectionImages],
    grid: int,
    device: torch.device,
    settings: DetectorSettings,
    recipe: Recipe,
    folder: Path,
    console: Console,
    show_progress: bool,
) -> dict[str, Any]:
    """The training loop; one metrics.jsonl line per EVAL_EVERY steps into `folder`."""
    import torch
    from torch.utils.data import DataLoader

    from vgdistill.training.optim import warmup_cosine

    generator = torch.Generator().manual_seed(settings.seed)
    # Decoded images are served from memory; worker processes would only copy them.
    workers = 0 if data["train"].cache is not None else recipe.data.num_workers
    train_loader = DataLoader(
        data["train"],
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=len(data["train"]) >= settings.batch_size,
        generator=generator,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    val_loader = DataLoader(data["val"], batch_size=256, num_workers=workers)
    params = [p for p in [*visual.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, settings.warmup_steps, settings.steps)
    )
    visual.train()
    step, t0, history = 0, time.perf_counter(), []
    parts: dict[str, float] = {}
    with (
        fitted.fit_progress("[bold]detector[/]", console, show_progress) as bar,
        open(folder / METRICS_FILE, "w", encoding="utf-8") as metrics,
    ):
        task = bar.add_task("fit", total=settings.steps, loss="-")
        while step < settings.steps:
            for image, mask, obj, cat, box, _ in train_loader:
                image, mask = image.to(device), mask.to(device)
                tokens, _, _ = visual(image, mask)
                valid = _valid_cells(mask, grid)
                loss, parts = _losses(
                    head(tokens).float(), obj.to(device), cat.to(device), box.to(device), valid
                )
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"detector loss is {loss.item()} at step {step}; lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(task, advance=1, loss=f"{loss.item():.3f}")
                if step % EVAL_EVERY == 0 or step == settings.steps:
                    line = {
                        "type": "detector",
                        "step": step,
                        **{f"loss_{k}": round(v, 4) for k, v in parts.items()},
                        **{
                            f"val_{k}": v
                            for k, v in evaluate_detector(visual, head, val_loader, device).items()
                        },
                        "time_s": round(time.perf_counter() - t0, 2),
                    }
                    history.append(line)
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                    if show_progress:
                        bar.console.print(
                            f"step {step}: loss {loss.item():.3f}  val objects found@0.5 "
                            f"{line['val_found50']:.3f}  category {line['val_category_acc']:.3f}",
                            highlight=False,
                        )
                if step >= settings.steps:
                    break
    visual.eval()
    last = history[-1]
    return {
        "metrics": {k[4:]: v for k, v in last.items() if k.startswith("val_")},
        "history": history,
        "fit_s": round(time.perf_counter() - t0, 2),
        "steps": step,
    }
