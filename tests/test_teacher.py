"""The open_clip teacher: frozen vs trainable, input preprocessing, phrase cache, precision."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vgdistill.losses.distillation import distill_loss  # noqa: E402
from vgdistill.models.teacher import Teacher  # noqa: E402
from vgdistill.recipe import from_dict  # noqa: E402


def distill_cfg(**kw):
    raw = {"teacher": "vgd-tiny-clip", "teacher_pretrained": "", **kw}
    return from_dict({"distill": raw}).distill


PHRASES = ["the man on the left", "red ball", "the man on the left"]


def images(b=3, size=96):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, size, size, generator=g)


def test_frozen_teacher_no_grad_and_eval_mode():
    torch.manual_seed(0)
    teacher = Teacher.from_config(distill_cfg())
    assert teacher.frozen and teacher.embed_dim == 64
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # what a training loop calling .train() on everything would do
    assert not teacher.training and not teacher.clip.training
    assert teacher.param_groups(1e-5) == []
    img, txt = teacher.encode(images(), PHRASES)
    assert img.shape == (3, 64) and txt.shape == (3, 64)
    assert not img.requires_grad and not txt.requires_grad
    student = torch.randn(3, 64, requires_grad=True)
    (distill_loss(student, img, "cosine") + distill_loss(student, txt, "l1")).backward()
    assert student.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_text_cache_hits_and_values():
    torch.manual_seed(0)
    teacher = Teacher.from_config(distill_cfg())
    _, first = teacher.encode(None, PHRASES, want_image=False)
    assert (teacher.cache_hits, teacher.cache_misses) == (0, 3) and len(teacher.cache) == 2
    _, again = teacher.encode(None, ["red ball", "the man on the left"], want_image=False)
    assert (teacher.cache_hits, teacher.cache_misses) == (2, 3)
    assert torch.equal(again[0], first[1]) and torch.equal(first[0], first[2])
    fresh = teacher.clip.encode_text(teacher.tokenizer(["red ball"]))[0]
    assert torch.allclose(again[0], fresh, atol=1e-5)
    img, txt = teacher.encode(images(), PHRASES, want_text=False)
    assert txt is None and img.shape == (3, 64)


def test_trainable_teacher_gets_gradient():
    torch.manual_seed(0)
    teacher = Teacher.from_config(distill_cfg(teacher_trainable=True))
    teacher.train()
    assert teacher.training and not teacher.frozen
    img, txt = teacher.encode(images(), PHRASES)
    assert img.requires_grad and txt.requires_grad
    student = torch.randn(3, 64)
    (distill_loss(student, img, "cosine") + distill_loss(student, txt, "cosine")).backward()
    visual = [p.grad for p in teacher.clip.visual.parameters()]
    text = [p.grad for p in teacher.clip.transformer.parameters()]
    assert all(g is not None for g in visual + text)
    assert sum(g.abs().sum() for g in visual) > 0 and sum(g.abs().sum() for g in text) > 0
    assert len(teacher.cache) == 0  # a changing teacher must not serve stale embeddings
    (group,) = teacher.param_groups(1e-5)
    assert group["lr"] == 1e-5 and len(group["params"]) == len(list(teacher.clip.parameters()))


def test_teacher_input_is_its_own_preprocessing():
    """ImageNet-normalised student image -> pixels -> resize -> teacher mean/std."""
    teacher = Teacher.from_config(distill_cfg())
    x = images(2, 96)
    mean_in = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std_in = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = x * std_in + mean_in
    resized = F.interpolate(pixels, size=(64, 64), mode="bicubic", antialias=True)
    pp = teacher.clip.visual.preprocess_cfg
    want = (resized - torch.tensor(pp["mean"]).view(1, 3, 1, 1)) / torch.tensor(pp["std"]).view(
        1, 3, 1, 1
    )
    assert torch.allclose(teacher.image_input(x), want, atol=1e-5)


def test_bf16_teacher_close_to_fp32():
    torch.manual_seed(0)
    t32 = Teacher.from_config(distill_cfg(teacher_precision="fp32"))
    t16 = Teacher.from_config(distill_cfg(teacher_precision="bf16"))
    t16.clip.load_state_dict(t32.clip.state_dict())
    a_img, a_txt = t32.encode(images(), PHRASES)
    b_img, b_txt = t16.encode(images(), PHRASES)
    assert next(t16.clip.parameters()).dtype == torch.bfloat16 and b_img.dtype == torch.float32
    assert F.cosine_similarity(a_img, b_img).min() > 0.99
    assert F.cosine_similarity(a_txt, b_txt).min() > 0.99
