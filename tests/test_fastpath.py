"""The fast path gives the plain path's numbers: forward, loss, gradients, one AdamW step.

Each speed feature that runs on a CPU is compared against its plain counterpart: SDPA vs
explicit softmax attention (DETR encoder, fusion, BERT), channels_last vs contiguous CNN
(tiny_cnn and a real ResNet-50), the fused AdamW kernel vs the for-loop one, the teacher's
phrase cache vs re-encoding, and the teacher in bf16 vs fp32. Tiny random models only.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgdistill.losses.distillation import DistillationTask  # noqa: E402
from vgdistill.models.factory import build_model, build_tokenizer  # noqa: E402
from vgdistill.models.teacher import Teacher  # noqa: E402
from vgdistill.recipe import from_dict  # noqa: E402
from vgdistill.tools.bench.fastpath import PLAIN, FastPath  # noqa: E402
from vgdistill.tools.bench.rig import Rig  # noqa: E402
from vgdistill.tools.bench.synthetic import synthetic_batches  # noqa: E402
from vgdistill.training.optim import build_optimizer  # noqa: E402

S, L, B = 64, 12, 4


def recipe(backbone="tiny_cnn"):
    """The tiny preset (64 px) with the tiny CLIP config as teacher."""
    return from_dict(
        {
            "model": {
                "preset": "tiny",
                "backbone": backbone,
            },
            "data": {"image_size": S, "max_query_len": L},
            "distill": {"teacher": "vgd-tiny-clip", "teacher_pretrained": ""},
            "train": {"lr": 1e-3, "lr_backbone": 1e-3, "lr_encoder": 1e-3, "lr_text": 1e-3},
        }
    )


def no_dropout(model):
    """Train mode without randomness: the tiny preset's only dropout is BERT's (0.1)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.text.bert.config.hidden_dropout_prob = 0.0
    model.text.bert.config.attention_probs_dropout_prob = 0.0
    return model


def one_step(model, batch, t_img, t_txt, fused):
    """Forward, loss, backward and one AdamW step; returns (output, loss, params after)."""
    r = recipe()
    module = DistillationTask(model, r.distill)
    groups = model.param_groups(r.train)
    # What training builds (fused on CPU and CUDA), or torch's default per-tensor loop.
    opt = build_optimizer(groups, r.train, "cpu") if fused else torch.optim.AdamW(groups)
    assert bool(opt.defaults.get("fused")) == fused
    out = model(batch["image"], batch["image_mask"], batch["input_ids"], batch["attention_mask"])
    loss, _ = module(batch, _Fixed(t_img, t_txt))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out, loss.detach(), grads, after


class _Fixed:
    """Fixed distillation targets (the teacher is compared on its own below)."""

    def __init__(self, img, txt):
        self.img, self.txt = img, txt

    def encode(self, image, phrases, *, image_mask=None, want_image=True, want_text=True):
        return self.img, self.txt


@pytest.mark.parametrize("backbone", ["tiny_cnn", "resnet50"])
def test_fast_path_equals_plain_path_through_one_optimizer_step(backbone):
    r = recipe(backbone)
    torch.manual_seed(0)
    fast = no_dropout(build_model(r, load_weights=False)).train()
    plain = copy.deepcopy(fast)
    plain.set_fast_path(False)
    assert fast.visual.backbone.channels_last and not plain.visual.backbone.channels_last
    batch = synthetic_batches(r, build_tokenizer(r.model), B, 1, seed=3, pin=False)[0]
    assert batch["image_mask"].any() and (batch["attention_mask"] == 0).any()  # masks matter
    start = {n: p.detach().clone() for n, p in fast.named_parameters()}
    g = torch.Generator().manual_seed(1)
    t_img, t_txt = torch.randn(B, 64, generator=g), torch.randn(B, 64, generator=g)
    # Fast path with the fused AdamW kernel; plain path with the for-loop AdamW.
    o1, loss1, g1, p1 = one_step(fast, batch, t_img, t_txt, fused=True)
    o2, loss2, g2, p2 = one_step(plain, batch, t_img, t_txt, fused=False)
    assert torch.allclose(o1.pred_boxes, o2.pred_boxes, atol=1e-5)
    assert torch.allclose(o1.student_img, o2.student_img, atol=1e-4)
    assert torch.allclose(o1.student_txt, o2.student_txt, atol=1e-4)
    assert torch.allclose(loss1, loss2, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 20
    # Gradients agree per tensor in norm. A 50-layer random ResNet has pre-activations within
    # 1e-6 of 0, where the summation order (channels_last convolutions sum differently) picks
    # the side of the ReLU: one flipped unit moves a layer's gradient by up to ~1e-2 of its
    # norm. Both are exact subgradients; the small tiny_cnn has no such ties.
    tol = 2e-2 if backbone == "resnet50" else 1e-4
    for name in g1:
        err = (g1[name] - g2[name]).norm()
        assert err <= tol * g2[name].norm() + 1e-6, (name, float(err), float(g2[name].norm()))
    # AdamW's first update is lr * g / (|g| + eps), close to lr * sign(g): where a gradient is
    # ~0 (e.g. attention key biases, whose true gradient is exactly 0) float noise decides the
    # sign, so the updates there may differ by up to 2 * lr. Wherever the gradient's sign is
    # clear on both paths, the updates must agree.
    lr = r.train.lr
    n_clear = n_nonzero = 0
    for name in g1:
        diff = (p1[name] - p2[name]).abs()
        assert diff.max() <= 2 * lr + 1e-6, name
        clear = g2[name].abs() > 1e-4 + 10 * (g1[name] - g2[name]).abs()
        if clear.any():
            assert diff[clear].max() <= 2e-6, name
        n_clear += int(clear.sum())
        n_nonzero += int((g2[name].abs() > 1e-4).sum())
    assert n_clear > 0.9 * n_nonzero  # the check above covers nearly every real gradient
    # The step really moved the weights (a step that did nothing would also be "equal").
    moved = [n for n in p1 if not torch.equal(p1[n], start[n])]
    assert len(moved) > 20


def test_fused_adamw_step_matches_for_loop_adamw():
    torch.manual_seed(0)
    r = recipe()
    a = build_model(r, load_weights=False)
    b = copy.deepcopy(a)
    start = {n: p.detach().clone() for n, p in a.named_parameters()}
    for m in (a, b):
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p) * 0.01 + 0.001 * p.detach()
    fused = build_optimizer(a.param_groups(r.train), r.train, "cpu")
    loop = torch.optim.AdamW(b.param_groups(r.train), foreach=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(3):
        fused.step()
        loop.step()
    changed = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name
        changed += int(not torch.equal(pa, start[name]))
    assert changed > 20


def test_teacher_cache_and_bf16_match_the_plain_teacher():
    r = recipe()
    torch.manual_seed(0)
    teacher = Teacher.from_config(r.distill, load_weights=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, S, S, generator=g)
    phrases = ["the man on the left", "red ball", "the man on the left"]
    teacher.use_cache = False
    img_plain, txt_plain = teacher.encode(images, phrases)
    assert (teacher.cache_hits, teacher.cache_misses, len(teacher.cache)) == (0, 0, 0)
    # The student's autocast does not reach the frozen teacher: same fp32 targets inside it.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img_ac, txt_ac = teacher.encode(images, phrases)
    assert img_ac.dtype == torch.float32
    assert torch.allclose(img_ac, img_plain, atol=1e-6) and torch.allclose(
        txt_ac, txt_plain, atol=1e-6
    )
    teacher.use_cache = True
    _, txt_cached = teacher.encode(images, phrases)
    _, txt_again = teacher.encode(None, list(reversed(phrases)), want_image=False)
    # Misses count phrases not cached when their batch arrived (the repeat in batch 1 too).
    assert (teacher.cache_misses, teacher.cache_hits, len(teacher.cache)) == (3, 3, 2)
    assert torch.allclose(txt_cached, txt_plain, atol=1e-5)
    assert torch.equal(txt_again, txt_cached.flip(0))
    # bf16 (the GPU default, forced here): same embeddings up to bf16 rounding.
    teacher.precision = "bf16"
    img16, txt16 = teacher.encode(images, phrases)
    assert next(teacher.clip.parameters()).dtype == torch.bfloat16
    assert len(teacher.cache) == 2  # refilled in bf16 (fp32 rows were dropped)
    cos = torch.nn.functional.cosine_similarity
    assert cos(img16, img_plain).min() > 0.99 and cos(txt16, txt_plain).min() > 0.99


def test_bench_rig_switches_every_feature_and_back():
    r = recipe()
    rig = Rig(r, torch.device("cpu"), 2, 2, seed=0)
    fast = rig.fast_path()
    assert fast.sdpa and fast.channels_last and fast.teacher_cache and not fast.tf32
    rig.apply(PLAIN)
    attn = [m for m in rig.student.modules() if type(m).__name__ == "Attention"]
    assert attn and not any(m.fast for m in attn)
    assert not rig.student.visual.backbone.channels_last and not rig.teacher.use_cache
    rig.train_step(teacher=True)
    rig.apply(fast)
    assert all(m.fast for m in attn) and rig.student.visual.backbone.channels_last
    assert rig.teacher.use_cache and len(rig.teacher.cache) == len(rig.phrases)
    hits = rig.teacher.cache_hits
    rig.train_step(teacher=True)
    rig.eval_step()
    assert rig.teacher.cache_hits == hits + 2  # both phrases of the step came from the cache
    assert fast.without("sdpa") == FastPath(**{**fast.__dict__, "sdpa": False})
    # A precision switch refills the cache in the new precision before anything is timed.
    rig.apply(FastPath(**{**fast.__dict__, "teacher_bf16": True}))
    assert next(rig.teacher.clip.parameters()).dtype == torch.bfloat16
    assert len(rig.teacher.cache) == len(rig.phrases)
    assert all(row.dtype == torch.bfloat16 for row in rig.teacher.cache.values())
    misses = rig.teacher.cache_misses
    rig.train_step(teacher=True)
    assert rig.teacher.cache_misses == misses
