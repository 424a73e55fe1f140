"""The bench rig: student, teacher, optimisers and synthetic batches, switchable between
FastPath configurations, with the training step, the evaluation step and a FLOP count."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from vgdistill.errors import VGError
from vgdistill.recipe import Recipe
from vgdistill.tools.bench.fastpath import PLAIN, FastPath
from vgdistill.tools.bench.synthetic import quiet, synthetic_batches, to_device


def bench_recipe(recipe: Recipe) -> Recipe:
    """The recipe as bench builds it: a teacher folder that does not exist yet (written by
    `vgdistill teacher` later) is replaced by its architecture, distill.teacher_arch."""
    from vgdistill.models.factory import needs_teacher
    from vgdistill.models.teacher import teacher_model_config

    if not needs_teacher(recipe):
        return recipe
    try:
        teacher_model_config(recipe.distill)
        return recipe
    except VGError as e:
        arch = recipe.distill.teacher_arch
        if not arch:
            raise VGError(
                f"{e}; bench builds the teacher with random weights from its architecture: set "
                "distill.teacher_arch (e.g. --set distill.teacher_arch=vgd-tiny-clip) or "
                "distill.teacher to an open_clip model name"
            ) from None
    distill = dataclasses.replace(recipe.distill, teacher=arch, teacher_pretrained="")
    return dataclasses.replace(recipe, distill=distill)


class ConstantTargets:
    """Fixed distillation targets in place of the teacher: the student-only step keeps the
    same loss and backward graph, and the difference to the real teacher is its cost."""

    def __init__(self, img: Tensor | None, txt: Tensor | None) -> None:
        self.img, self.txt = img, txt

    def encode(
        self,
        image: Any,
        phrases: Any,
        *,
        image_mask: Any = None,
        want_image: bool = True,
        want_text: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """The fixed targets (shape [B,E]) for the modalities asked for (Teacher.encode's call)."""
        return (self.img if want_image else None), (self.txt if want_text else None)


class Rig:
    """Student, teacher, optimisers and batches, switchable between FastPath configurations."""

    def __init__(
        self, recipe: Recipe, device: torch.device, batch: int, eval_batch: int, seed: int
    ) -> None:
        from vgdistill.losses.distillation import DistillationTask
        from vgdistill.models.factory import build_model, build_tokenizer, needs_teacher
        from vgdistill.models.teacher import Teacher
        from vgdistill.training.optim import build_optimizer
        from vgdistill.training.visual_cache import cache_blocker

        self.recipe, self.device = recipe, device
        torch.manual_seed(seed)
        self.tokenizer = build_tokenizer(recipe.model)
        self.student = build_model(recipe, load_weights=False).to(device)
        self.teacher = None
        if needs_teacher(recipe):
            with quiet():
                self.teacher = Teacher.from_config(recipe.distill, load_weights=False)
            self.teacher.to(device)
        pin = device.type == "cuda"
        n = 3  # distinct batches, cycled
        self.batches = synthetic_batches(recipe, self.tokenizer, batch, n, seed, pin)
        self.eval_batches = synthetic_batches(recipe, self.tokenizer, eval_batch, n, seed + 1, pin)
        self.phrases = sorted({p for b in self.batches for p in b["phrases"]})
        self.batch, self.eval_batch = batch, eval_batch
        self._i = 0
        groups = self.student.param_groups(recipe.train)
        # The optimiser training builds (fused where torch has the kernel) and torch's default.
        self.opt_fast = build_optimizer(groups, recipe.train, device.type)
        self.opt_plain = torch.optim.AdamW(
            groups, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay
        )
        self.fast_fused = bool(self.opt_fast.defaults.get("fused"))
        e = self.student.embed_dim
        g = torch.Generator().manual_seed(seed)
        self.targets = ConstantTargets(
            torch.randn(batch, e, generator=g).to(device) if e else None,
            torch.randn(batch, e, generator=g).to(device) if e else None,
        )
        # One task for both steps: the student-only step passes fixed targets as its teacher.
        self.task = DistillationTask(self.student, recipe.distill)
        self._compiled: Any = None
        self.fp: FastPath | None = None
        self.optimizer = self.opt_fast
        self.scaler: Any = None
        self.cached_batches: list[dict[str, Any]] | None = None
        if cache_blocker(recipe) is None:
            self.cached_batches = [self._cached(b, pin) for b in self.batches]

    @torch.no_grad()
    def _cached(self, batch: dict[str, Any], pin: bool) -> dict[str, Any]:
        """`batch` as a cached training batch: the frozen visual branch's tokens and the
        teacher's image embeddings in place of the pixels (what CachedRows serves)."""
        on = to_device(batch, self.device)
        self.student.eval()
        tokens, pad, _ = self.student.visual(on["image"], on["image_mask"])
        out = {k: v for k, v in batch.items() if k not in ("image", "image_mask")}
        out.update(visual_tokens=tokens.float().cpu(), visual_pad=pad.cpu())
        if self.teacher is not None and self.recipe.distill.modality in ("both", "image"):
            emb, _ = self.teacher.encode(
                on["image"], None, image_mask=on["image_mask"], want_image=True, want_text=False
            )
            out["teacher_image"] = emb.float().cpu()
        if pin:
            out = {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in out.items()}
        return out

    # -- configuration ----------------------------------------------------------------------

    def fast_path(self) -> FastPath:
        """The configuration training uses for this recipe on this device."""
        cuda = self.device.type == "cuda"
        r = self.recipe
        teacher_bf16 = bool(
            self.teacher is not None and self.teacher.run_dtype(self.device) == torch.bfloat16
        )
        return FastPath(
            sdpa=True,
            channels_last=bool(r.model.channels_last and self.student.visual.backbone.is_cnn),
            autocast=r.train.mixed_precision,
            fused_adamw=self.fast_fused,
            tf32=cuda,
            cudnn_benchmark=cuda,
            compile=r.train.compile,
            teacher_cache=self.teacher is not None and r.distill.modality in ("both", "text"),
            teacher_bf16=teacher_bf16,
        )

    def apply(self, fp: FastPath) -> None:
        """Switch every feature to `fp` (weights stay; optimiser moments start afresh)."""
        from vgdistill.device import set_cuda_speed_flags
        from vgdistill.models.layers import Attention

        if fp == self.fp:
            return
        s = self.student
        for m in s.modules():
            if isinstance(m, Attention):
                m.fast = fp.sdpa
        s.text.set_fast(fp.sdpa)
        s.visual.backbone.set_channels_last(fp.channels_last)
        set_cuda_speed_flags(self.device, tf32=fp.tf32, benchmark=fp.cudnn_benchmark)
        if self.teacher is not None:
            self._apply_teacher(fp)
        # Moments in the old memory format must not meet parameters in the new one, and two
        # optimisers' state would double the memory: both start empty at each switch.
        self.opt_fast.state.clear()
        self.opt_plain.state.clear()
        self.optimizer = self.opt_fast if fp.fused_adamw == self.fast_fused else self.opt_plain
        self.scaler = torch.amp.GradScaler(self.device.type) if fp.autocast == "fp16" else None
        self.task.student = self._student_module(fp)
        self.fp = fp

    def _apply_teacher(self, fp: FastPath) -> None:
        """The teacher's cache and precision as `fp` has them, its cache filled if on."""
        assert self.teacher is not None
        self.teacher.use_cache = fp.teacher_cache
        self.teacher.precision = "bf16" if fp.teacher_bf16 else "fp32"
        # An empty call casts the teacher to its new precision now (dropping a cache
        # computed in the old one), so the refill below is in the precision that is timed.
        self.teacher.encode(None, None)
        missing = [p for p in self.phrases if p not in self.teacher.cache]
        if fp.teacher_cache and missing:
            # As training does (Trainer._prewarm_text_cache): every phrase embedded once.
            self.teacher.encode(None, missing, want_image=False)

    def _student_module(self, fp: FastPath) -> Any:
        if not fp.compile:
            return self.student
        if self._compiled is None:
            # Fixed shapes: one graph per batch shape, no dynamic-shape kernels.
            self._compiled = torch.compile(self.student, dynamic=False)
        return self._compiled

    def _autocast(self, fp: FastPath) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(fp.autocast)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _next(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        self._i = (self._i + 1) % len(batches)
        return to_device(batches[self._i], self.device)

    # -- steps ------------------------------------------------------------------------------

    def train_step(self, teacher: bool, cached: bool = False) -> None:
        """One optimiser step on the next synthetic batch (what the training loop does);
        `cached`: on the next cached batch, with the teacher where it has a part to play."""
        from vgdistill.training.loop import optimizer_step

        assert self.fp is not None
        assert not teacher or self.teacher is not None
        if cached:
            assert self.cached_batches is not None
            batch = self._next(self.cached_batches)
        else:
            batch = self._next(self.batches)
        self.student.train()
        with self._autocast(self.fp):
            loss, _ = self.task(batch, self.teacher if teacher else self.targets)
        optimizer_step(loss, self.optimizer, scaler=self.scaler)

    def eval_step(self) -> None:
        """One evaluation forward pass on the next synthetic eval batch."""
        assert self.fp is not None
        batch = self._next(self.eval_batches)
        model = self.task.student
        self.student.eval()
        with torch.inference_mode(), self._autocast(self.fp):
            out = model(
                batch["image"], batch["image_mask"], batch["input_ids"], batch["attention_mask"]
            )
            out.pred_boxes.float()

    # -- FLOPs ------------------------------------------------------------------------------

    def count_flops(self, n: int) -> dict[str, float]:
        """FLOPs per image (torch.utils.flop_counter) of a training step's forward+backward,
        of an evaluation forward, and of the teacher's image and text towers.

        Counted on the plain path in fp32 (explicit matmul attention, which the counter
        sees on every device); precision and kernels change the time, not the count.
        """
        previous = self.fp or PLAIN
        self.apply(PLAIN)
        batch = {k: v[:n] if isinstance(v, Tensor) else v[:n] for k, v in self.batches[0].items()}
        batch = to_device(batch, self.device)
        train = self._train_flops(batch, n) / n
        evalf = self._eval_flops(batch) / n
        t_img = t_txt = 0.0
        if self.teacher is not None:
            t_img, t_txt = (f / n for f in self._teacher_flops(batch))
        self.apply(previous)
        return {
            "train_per_image": train,
            "eval_per_image": evalf,
            "teacher_image_per_image": t_img,
            "teacher_text_per_phrase": t_txt,
        }

    def _train_flops(self, batch: dict[str, Any], n: int) -> int:
        """FLOPs of the training loss's forward and backward on `batch` (fixed targets)."""
        from torch.utils.flop_counter import FlopCounterMode

        from vgdistill.losses.distillation import DistillationTask

        targets = ConstantTargets(
            torch.zeros(n, max(1, self.student.embed_dim), device=self.device),
            torch.zeros(n, max(1, self.student.embed_dim), device=self.device),
        )
        module = DistillationTask(self.student, self.recipe.distill)
        self.student.train()
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = module(batch, targets)
            loss.backward()
        self.student.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def _eval_flops(self, batch: dict[str, Any]) -> int:
        """FLOPs of an evaluation forward on `batch`."""
        from torch.utils.flop_counter import FlopCounterMode

        self.student.eval()
        # The counter's module tracker hooks every input that requires grad, which fails for
        # views of parameters made under inference mode: count with gradients switched off.
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        counter = FlopCounterMode(display=False)
        try:
            with counter, torch.inference_mode():
                self.student(
                    batch["image"], batch["image_mask"], batch["input_ids"], batch["attention_mask"]
                )
        finally:
            for p in trainable:
                p.requires_grad_(True)
        return counter.get_total_flops()

    def _teacher_flops(self, batch: dict[str, Any]) -> tuple[int, int]:
        """FLOPs of the teacher's image tower and text tower on `batch`."""
        from torch.utils.flop_counter import FlopCounterMode

        assert self.teacher is not None
        # The towers are called directly, outside inference mode, on an input that
        # requires grad: otherwise nn.MultiheadAttention takes its fused inference kernel,
        # which the counter does not see (it would miss every attention projection).
        clip = self.teacher.clip
        x = self.teacher.image_input(batch["image"], batch["image_mask"]).requires_grad_()
        counter = FlopCounterMode(display=False)
        with counter:
            clip.encode_image(x)
        image = counter.get_total_flops()
        tokens = self.teacher.tokenizer(list(batch["phrases"])).to(self.device)
        counter = FlopCounterMode(display=False)
        with counter:
            _text_tower_with_grad(clip, tokens)
        return image, counter.get_total_flops()


def _text_tower_with_grad(clip: Any, tokens: Tensor) -> None:
    """CLIP's text tower with a grad-requiring embedding output (see Rig._teacher_flops)."""
    emb = getattr(clip, "token_embedding", None)
    if emb is None:  # a text tower of another kind: counted as it runs
        clip.encode_text(tokens)
        return
    handle = emb.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_())
    try:
        clip.encode_text(tokens)
    finally:
        handle.remove()
