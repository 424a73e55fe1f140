"""The open_clip teacher: frozen vs trainable, input preprocessing, phrase cache, precision."""

from __future__ import annotations

import os

import pytest
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


def normalize(image, mask):
    """The float path's input: ImageNet-normalised, padding 0."""
    from vgdistill.models.visual import normalize_pixels

    return normalize_pixels(image, mask)


def _letterboxed(top, left, size=96, region=(40, 90), b=1):
    """uint8 images [b,3,size,size] holding one smooth region at (top, left), padding 0 around
    it, and their masks (True on padding); smooth so PIL's and torch's bicubic agree closely."""
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (b, 3, 8, 12), generator=g).float()
    pixels = F.interpolate(small, size=region, mode="bilinear", align_corners=False)
    pixels = pixels.round().clamp(0, 255).to(torch.uint8)
    image = torch.zeros(b, 3, size, size, dtype=torch.uint8)
    mask = torch.ones(b, size, size, dtype=torch.bool)
    image[:, :, top : top + region[0], left : left + region[1]] = pixels
    mask[:, top : top + region[0], left : left + region[1]] = False
    return image, mask, pixels


def test_uint8_pixels_with_their_mask_are_the_float_path_bit_for_bit():
    torch.manual_seed(0)
    teacher = Teacher.from_config(distill_cfg())
    image, mask, _ = _letterboxed(30, 3, b=2)
    floats = normalize(image, mask)
    assert torch.equal(teacher.image_input(image, mask), teacher.image_input(floats))
    a, _ = teacher.encode(image, None, image_mask=mask, want_text=False)
    b, _ = teacher.encode(floats, None, want_text=False)
    assert torch.equal(a, b)
    # Without the mask, uint8 padding would read as black instead of the float path's 0.
    with pytest.raises(ValueError, match="image_mask"):
        teacher.encode(image, None, want_text=False)


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_image_view_is_the_teachers_own_preprocessing_of_the_image_region(mode):
    """teacher_view = image: open_clip's eval transform (its resize_mode) applied to the image
    alone, wherever the transform placed it in the padded square."""
    import open_clip
    from PIL import Image

    teacher = Teacher.from_config(distill_cfg(teacher_view="image"))
    assert teacher.view == "image" and teacher.input_size == (64, 64)
    teacher.resize_mode = mode  # open_clip's preprocess_cfg chooses it per model
    pp = teacher.clip.visual.preprocess_cfg
    reference = open_clip.image_transform(
        pp["size"],
        is_train=False,
        mean=pp["mean"],
        std=pp["std"],
        resize_mode=mode,
        interpolation=pp["interpolation"],
    )
    image, mask, pixels = _letterboxed(10, 3)
    got = teacher.image_input(image, mask)[0]
    want = reference(Image.fromarray(pixels[0].permute(1, 2, 0).numpy()))
    # PIL resizes in 8 bits: within two grey levels of the teacher's normalisation.
    level = 1 / 255 / min(pp["std"])
    assert got.shape == want.shape == (3, 64, 64)
    assert (got - want).abs().max() < 2 * level and (got - want).abs().mean() < 0.5 * level
    elsewhere = teacher.image_input(*_letterboxed(50, 0)[:2])[0]
    assert torch.equal(elsewhere, got)
    with pytest.raises(ValueError, match="image_mask"):
        teacher.image_input(normalize(image, mask))


def test_padded_and_image_views_differ_only_where_there_is_padding():
    torch.manual_seed(0)
    padded = Teacher.from_config(distill_cfg())
    image_view = Teacher.from_config(distill_cfg(teacher_view="image"))
    image_view.load_state_dict(padded.state_dict())
    boxed, mask, _ = _letterboxed(10, 3)
    assert not torch.allclose(padded.image_input(boxed, mask), image_view.image_input(boxed, mask))
    # A square image filling the whole frame: both views see the same pixels.
    full = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    none = torch.zeros(2, 96, 96, dtype=torch.bool)
    assert torch.equal(padded.image_input(full, none), image_view.image_input(full, none))
    with pytest.raises(ValueError, match="every pixel"):
        image_view.image_input(full, torch.ones(2, 96, 96, dtype=torch.bool))


def test_distillation_step_on_uint8_batch_equals_the_float_batch():
    """The training step's losses (student + teacher image target) from uint8 pixels and
    their mask are those of the ImageNet-normalised batch, in both teacher views."""
    from vgdistill.losses.distillation import DistillationTask
    from vgdistill.models.factory import build_model

    image, mask, _ = _letterboxed(12, 0, size=64, region=(40, 64), b=2)
    ids = torch.tensor([[101, 2417, 3608, 102, 0], [101, 2158, 102, 0, 0]])
    batch = {
        "image": image,
        "image_mask": mask,
        "input_ids": ids,
        "attention_mask": (ids > 0).long(),
        "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3]]),
        "phrases": ["red ball", "the man"],
    }
    for view in ("padded", "image"):
        torch.manual_seed(0)
        recipe = from_dict(
            {
                "model": {"preset": "tiny"},
                "data": {"image_size": 64, "max_query_len": 5},
                "distill": {
                    "teacher": "vgd-tiny-clip",
                    "teacher_pretrained": "",
                    "teacher_view": view,
                },
            }
        )
        task = DistillationTask(build_model(recipe, load_weights=False).eval(), recipe.distill)
        teacher = Teacher.from_config(recipe.distill)
        loss_u8, parts_u8 = task(batch, teacher)
        loss_f, parts_f = task(dict(batch, image=normalize(image, mask)), teacher)
        assert torch.equal(loss_u8, loss_f), view
        assert parts_u8["loss_distill_img"] > 0
