"""EpmVG student: shapes, masks, fast/plain paths, losses, distillation routing, checkpoints.

Tiny random models only (tiny preset: tiny_cnn + 2-layer 64-d BERT, 64-px images).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgdistill.errors import VGError  # noqa: E402
from vgdistill.losses.distillation import (  # noqa: E402
    distill_loss,
    distillation_losses,
    total_loss,
)
from vgdistill.losses.grounding import box_losses  # noqa: E402
from vgdistill.models.boxes import (  # noqa: E402
    box_iou,
    cxcywh_to_xyxy,
    generalized_box_iou,
    paired_box_iou,
    paired_generalized_box_iou,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from vgdistill.models.checkpoint import (  # noqa: E402
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from vgdistill.models.epmvg import GroundingOutput  # noqa: E402
from vgdistill.models.factory import build_model  # noqa: E402
from vgdistill.recipe import from_dict  # noqa: E402

S, L, B = 64, 12, 3
ROOT_RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny.toml")


def tiny_recipe(model=None, distill=None, train=None):
    """The tiny preset at 64 px with the tiny CLIP config as teacher (no weights needed)."""
    return from_dict(
        {
            "model": {"preset": "tiny", **(model or {})},
            "data": {"image_size": S, "max_query_len": L},
            "distill": {"teacher": "vgd-tiny-clip", "teacher_pretrained": "", **(distill or {})},
            "train": train or {},
        }
    )


def make_batch(seed=0, b=B):
    """Images padded on the right half, phrases of 5 real tokens then padding."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, S, S, generator=g)
    mask = torch.zeros(b, S, S, dtype=torch.bool)
    mask[:, :, 32:] = True  # right half is padding (feature columns 4..7 of the 8x8 grid)
    image = image.masked_fill(mask[:, None], 0.0)
    ids = torch.randint(1000, 3000, (b, L), generator=g)
    ids[:, 0], ids[:, 6] = 101, 102
    am = torch.zeros(b, L, dtype=torch.long)
    am[:, :7] = 1
    ids[:, 7:] = 0
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3]]).repeat(b, 1)
    return {
        "image": image,
        "image_mask": mask,
        "input_ids": ids,
        "attention_mask": am,
        "boxes": boxes,
    }


def run(model, batch, **kw):
    return model(
        batch["image"], batch["image_mask"], batch["input_ids"], batch["attention_mask"], **kw
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_recipe(), load_weights=False).eval()


def test_shapes_and_ranges(model):
    batch = make_batch()
    out = run(model, batch, return_attention=True)
    assert out.pred_boxes.shape == (B, 4) and out.pred_boxes.dtype == torch.float32
    assert ((out.pred_boxes > 0) & (out.pred_boxes < 1)).all()
    assert out.student_img.shape == (B, 64) and out.student_txt.shape == (B, 64)
    assert out.feature_hw == (8, 8) and out.attention.shape == (B, 64)
    att = out.attention.view(B, 8, 8)
    assert torch.all(att[:, :, 4:] == 0), "attention on padded visual tokens"
    assert torch.all(att.sum((1, 2)) <= 1 + 1e-5) and torch.all(att.sum((1, 2)) > 0)
    assert run(model, batch).attention is None


def test_padded_tokens_do_not_change_prediction(model):
    batch = make_batch()
    ref = run(model, batch).pred_boxes
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][:, 7:] = torch.randint(1000, 3000, (B, L - 7))
    assert torch.allclose(run(model, other).pred_boxes, ref, atol=1e-6)
    # Control: changing a real token does change the prediction.
    other["input_ids"][:, 2] += 1
    assert not torch.allclose(run(model, other).pred_boxes, ref, atol=1e-6)


def test_padded_pixels_do_not_change_prediction(model):
    batch = make_batch()
    ref = run(model, batch).pred_boxes
    noisy = dict(
        batch, image=batch["image"] + 5 * torch.randn(B, 3, S, S) * batch["image_mask"][:, None]
    )
    assert torch.equal(run(model, noisy).pred_boxes, ref)


def test_masked_visual_tokens_are_ignored(model):
    """Noise added to backbone features at padded grid cells must not reach [REG]."""
    batch = make_batch()
    grid_pad = torch.zeros(B, 1, 8, 8)
    grid_pad[..., 4:] = 1.0

    def add_noise(module, inputs, output):
        return output + 10 * torch.randn_like(output) * grid_pad

    unmasked = dict(batch, image_mask=torch.zeros_like(batch["image_mask"]))
    ref, ref_unmasked = run(model, batch).pred_boxes, run(model, unmasked).pred_boxes
    handle = model.visual.backbone.register_forward_hook(add_noise)
    try:
        assert torch.allclose(run(model, batch).pred_boxes, ref, atol=1e-5)
        # Control: without the mask the same noise does change the box.
        assert not torch.allclose(run(model, unmasked).pred_boxes, ref_unmasked, atol=1e-5)
    finally:
        handle.remove()


def test_fast_path_equals_plain_path():
    torch.manual_seed(1)
    # eval(): BERT keeps its dropout (0.1) in the tiny preset; gradients still flow.
    fast = build_model(tiny_recipe(), load_weights=False).eval()
    plain = copy.deepcopy(fast)
    plain.set_fast_path(False)
    assert fast.visual.backbone.channels_last and not plain.visual.backbone.channels_last
    batch = make_batch()
    t_img, t_txt = torch.randn(B, 64), torch.randn(B, 64)
    outs = []
    for m in (fast, plain):
        out = run(m, batch, return_attention=True)
        loss, _ = total_loss(out, batch["boxes"], t_img, t_txt, tiny_recipe().distill)
        loss.backward()
        outs.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = outs
    assert torch.allclose(o1.pred_boxes, o2.pred_boxes, atol=1e-5)
    assert torch.allclose(o1.student_img, o2.student_img, atol=1e-4)
    assert torch.allclose(o1.attention, o2.attention, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 50
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-4, rtol=1e-3), name


def test_box_conversions_and_iou():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert torch.allclose(xyxy_to_cxcywh(xyxy), torch.tensor([[20.0, 40.0, 20.0, 40.0]]))
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)
    assert torch.allclose(xyxy_to_xywh(xyxy), torch.tensor([[10.0, 20.0, 20.0, 40.0]]))
    assert torch.allclose(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy)
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # overlap 1, union 4 + 4 - 1 = 7; hull 3x3 = 9 -> giou = 1/7 - 2/9
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7], [0.0]]))
    assert torch.allclose(generalized_box_iou(a, b)[0, 0], torch.tensor(1 / 7 - 2 / 9))
    assert torch.allclose(paired_box_iou(a, b.expand(2, 4)), torch.tensor([1 / 7, 0.0]))
    # disjoint: union 1 + 4 = 5, hull 9 -> -4/9
    assert torch.allclose(paired_generalized_box_iou(a, b.expand(2, 4))[1], torch.tensor(-4 / 9))


def test_losses_on_hand_computed_inputs(model):
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1]])
    tgt = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.75, 0.75, 0.1, 0.1]])
    l1, giou = box_losses(pred, tgt)
    # L1: (0.2 + 0.2) + (0.5 + 0.5) summed per box, / 2 boxes = 0.7
    assert math.isclose(l1.item(), 0.7, rel_tol=1e-6)
    # GIoU: box 1 inside box 2: IoU 0.04 / 0.16 = 0.25, hull = union -> 0.25;
    # box 2 disjoint: IoU 0, union 0.02, hull 0.6^2 = 0.36 -> -(0.34 / 0.36).
    expected_giou = ((1 - 0.25) + (1 + 0.34 / 0.36)) / 2
    assert math.isclose(giou.item(), expected_giou, rel_tol=1e-5)
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert math.isclose(distill_loss(s, t, "cosine").item(), 0.5, rel_tol=1e-6)  # (1 + 0) / 2
    assert math.isclose(distill_loss(s, t, "l1").item(), 1.25, rel_tol=1e-6)  # (1+2+1+1) / 4
    assert math.isclose(distill_loss(s, t, "mse").item(), 1.75, rel_tol=1e-6)  # (1+4+1+1) / 4
    # The model's total: L1 + GIoU + 1.5 * L_dv + 2.0 * L_dl with cosine distillation.
    out = GroundingOutput(pred_boxes=pred, student_img=s, student_txt=s.flip(0))
    total, parts = total_loss(out, tgt, t, t, tiny_recipe().distill)
    l_txt = distill_loss(s.flip(0), t, "cosine").item()
    assert math.isclose(l_txt, 1 - 1 / math.sqrt(2), rel_tol=1e-5)  # cos = 1/sqrt(2) twice
    assert math.isclose(total.item(), 0.7 + expected_giou + 1.5 * 0.5 + 2.0 * l_txt, rel_tol=1e-5)
    assert set(parts) == {"loss_l1", "loss_giou", "loss_distill_img", "loss_distill_txt"}
    assert not any(v.requires_grad for v in parts.values())


def _grads(model):
    """Which top-level parts received a non-zero gradient."""
    parts = {}
    for name, p in model.named_parameters():
        key = ".".join(name.split(".")[:2]) if name.startswith("visual") else name.split(".")[0]
        g = p.grad is not None and bool(p.grad.abs().sum() > 0)
        parts[key] = parts.get(key, False) or g
    return parts


@pytest.mark.parametrize(
    "position, expect",
    [
        # At `fusion` the [REG] token is a key of the distilled tokens, so it gets gradient.
        (
            "fusion",
            {
                "fusion": True,
                "visu_proj": True,
                "text_proj": True,
                "vl_pos_embed": True,
                "reg_token": True,
            },
        ),
        (
            "linear",
            {
                "fusion": False,
                "visu_proj": True,
                "text_proj": True,
                "vl_pos_embed": False,
                "reg_token": False,
            },
        ),
        (
            "backbone",
            {
                "fusion": False,
                "visu_proj": False,
                "text_proj": False,
                "vl_pos_embed": False,
                "reg_token": False,
            },
        ),
        # At `cnn` the DETR encoder and its 1x1 input projection are past the distilled map.
        (
            "cnn",
            {
                "fusion": False,
                "visu_proj": False,
                "text_proj": False,
                "vl_pos_embed": False,
                "reg_token": False,
                "visual.encoder": False,
                "visual.input_proj": False,
            },
        ),
    ],
)
def test_distill_position_routes_gradient(position, expect):
    torch.manual_seed(2)
    m = build_model(tiny_recipe(distill={"position": position}), load_weights=False).train()
    batch = make_batch()
    out = run(m, batch)
    l_img, l_txt = distillation_losses(out, torch.randn(B, 64), torch.randn(B, 64), "cosine")
    (1.5 * l_img + 2.0 * l_txt).backward()
    got = _grads(m)
    for part, want in expect.items():
        assert got[part] is want, (position, part)
    # Distillation never trains the box head; it always reaches both branches.
    assert not got["bbox_embed"]
    for part in ("visual.backbone", "visual.encoder", "text", "distill_img", "distill_txt"):
        if part not in expect:
            assert got[part], (position, part)


@pytest.mark.parametrize("pool", ["first", "mean"])
def test_cnn_position_distils_the_cnn_map_and_bert_embeddings(pool):
    """cnn: the image feature is the backbone map before input_proj, the text feature BERT's
    embedding output; both pooled as distill.pool says, padding left out of the mean."""
    torch.manual_seed(3)
    m = build_model(
        tiny_recipe(distill={"position": "cnn", "pool": pool}), load_weights=False
    ).eval()
    assert m.distill_img.in_features == m.visual.backbone.num_channels == 128
    assert m.distill_txt.in_features == m.text.num_channels
    batch = make_batch()
    out = run(m, batch)
    with torch.no_grad():
        fmap = m.visual.backbone(batch["image"])  # [B,128,8,8]; columns 4..7 are padding
        emb = m.text.bert.embeddings(input_ids=batch["input_ids"])  # [B,L,C]
    if pool == "first":
        img, txt = fmap[:, :, 0, 0], emb[:, 0]
    else:
        img = fmap[:, :, :, :4].mean((2, 3))
        txt = emb[:, :7].mean(1)  # 7 real tokens
    assert torch.allclose(out.student_img, m.distill_img(img), atol=1e-5)
    assert torch.allclose(out.student_txt, m.distill_txt(txt), atol=1e-5)
    # Nothing past the embeddings reaches the text feature: BERT's layers get no gradient.
    m.train()
    l_img, l_txt = distillation_losses(run(m, batch), torch.randn(B, 64), torch.randn(B, 64), "l1")
    (l_img + l_txt).backward()
    bert = m.text.bert
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bert.embeddings.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in bert.encoder.parameters())


def test_cnn_position_with_cached_tokens_refuses_image_distillation(model):
    from vgdistill.losses.distillation import DistillationTask
    from vgdistill.recipe import load_recipe
    from vgdistill.training.visual_cache import cache_blocker

    r = tiny_recipe(distill={"position": "cnn"})
    m = build_model(r, load_weights=False).eval()
    batch = make_batch()
    tokens, pad, _ = m.visual(batch["image"], batch["image_mask"])
    cached = {**batch, "visual_tokens": tokens, "visual_pad": pad, "phrases": ["a"] * B}
    del cached["image"], cached["image_mask"]
    out = m(None, None, batch["input_ids"], batch["attention_mask"], visual=(tokens, pad))
    assert out.student_img is None and out.student_txt is not None  # boxes still predicted
    task = DistillationTask(m, r.distill)
    with pytest.raises(ValueError, match="distill.position = cnn needs pixels"):
        task(dict(cached, teacher_image=torch.randn(B, 64)))
    # So training with a frozen branch never caches tokens for it.
    frozen = ["train.lr_backbone=0", "train.lr_encoder=0"]
    assert cache_blocker(load_recipe(ROOT_RECIPE, frozen)) is None
    blocked = cache_blocker(load_recipe(ROOT_RECIPE, [*frozen, 'distill.position="cnn"']))
    assert "distill.position = cnn" in blocked
    text_only = [*frozen, 'distill.position="cnn"', 'distill.modality="text"']
    assert cache_blocker(load_recipe(ROOT_RECIPE, text_only)) is None


def _pixels(seed=0, b=B):
    """uint8 images with the right half padding (0), as the uint8 transforms hand them over."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (b, 3, S, S), generator=g, dtype=torch.uint8)
    mask = torch.zeros(b, S, S, dtype=torch.bool)
    mask[:, :, 32:] = True
    return image.masked_fill(mask[:, None], 0), mask


def test_normalize_pixels_is_the_float_transform_bit_for_bit():
    from vgdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from vgdistill.models.visual import normalize_pixels

    pixels, mask = _pixels()
    # Today's float path written out: per-sample (x / 255 - mean) / std, padding left at 0.
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    want = torch.zeros(B, 3, S, S)
    for i in range(B):
        want[i, :, :, :32] = (pixels[i, :, :, :32].float() / 255.0 - mean) / std
    got = normalize_pixels(pixels, mask)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(normalize_pixels(pixels[0], mask[0]), want[0])  # one image [3,S,S]
    # Every 8-bit level, not just the ones a random draw hits.
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    full = (levels.float() / 255.0 - mean) / std
    assert torch.equal(normalize_pixels(levels, torch.zeros(1, 16, 16, dtype=torch.bool)), full)
    # Floats are already normalised: returned as they are.
    assert normalize_pixels(want, mask) is want
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(pixels.long(), mask)


def test_uint8_pixels_give_the_same_outputs_as_normalised_floats(model):
    from vgdistill.models.visual import normalize_pixels

    pixels, mask = _pixels(1)
    batch = dict(make_batch(), image=pixels, image_mask=mask)
    floats = dict(batch, image=normalize_pixels(pixels, mask))
    a, b = run(model, batch), run(model, floats)
    for name in ("pred_boxes", "student_img", "student_txt"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_box_loss_does_not_train_projections(model):
    m = copy.deepcopy(model).train()
    out = run(m, make_batch())
    l1, giou = box_losses(out.pred_boxes, make_batch()["boxes"])
    (l1 + giou).backward()
    got = _grads(m)
    assert got["bbox_embed"] and got["fusion"] and got["visual.backbone"] and got["text"]
    assert not got["distill_img"] and not got["distill_txt"]


@pytest.mark.parametrize("modality", ["none", "image", "text"])
def test_modalities(modality):
    m = build_model(tiny_recipe(distill={"modality": modality}), load_weights=False).eval()
    out = run(m, make_batch())
    assert (out.student_img is None) is (modality in ("none", "text"))
    assert (out.student_txt is None) is (modality in ("none", "image"))
    assert (m.distill_img is None) is (out.student_img is None)
    t_img, t_txt = torch.randn(B, 64), torch.randn(B, 64)
    _, parts = total_loss(out, make_batch()["boxes"], t_img, t_txt, tiny_recipe().distill)
    if modality == "none":
        assert parts["loss_distill_img"] == 0 and parts["loss_distill_txt"] == 0


def test_mean_pool_ignores_padding():
    m = build_model(
        tiny_recipe(distill={"pool": "mean", "position": "linear"}), load_weights=False
    ).eval()
    batch = make_batch()
    ref = run(m, batch).student_txt
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][:, 8] = 2500
    assert torch.allclose(run(m, other).student_txt, ref, atol=1e-5)


def test_param_groups_and_freezing():
    r = tiny_recipe(train={"lr": 1e-4, "lr_backbone": 2e-5, "lr_encoder": 3e-5, "lr_text": 0.0})
    m = build_model(r, load_weights=False)
    assert not any(p.requires_grad for p in m.text.parameters())  # lr_text = 0 freezes BERT
    groups = {g["name"]: g for g in m.param_groups(r.train)}
    assert set(groups) == {"backbone", "encoder", "rest"}
    assert groups["backbone"]["lr"] == 2e-5 and groups["encoder"]["lr"] == 3e-5
    n_grouped = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_grouped == sum(p.numel() for p in m.parameters() if p.requires_grad)
    ids = {id(p) for p in groups["encoder"]["params"]}
    assert id(m.visual.input_proj.weight) in ids
    assert id(m.distill_img.weight) in {id(p) for p in groups["rest"]["params"]}


def test_resnet_is_detr_style():
    from torchvision.ops.misc import FrozenBatchNorm2d

    from vgdistill.models.backbones import Backbone

    bb = Backbone("resnet50")
    assert isinstance(bb.body.bn1, FrozenBatchNorm2d)
    frozen = {n.split(".")[0] for n, p in bb.body.named_parameters() if not p.requires_grad}
    trained = {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}
    for size in (64, 70):
        with torch.no_grad():
            out = bb(torch.zeros(1, 3, size, size))
        assert out.shape[1:] == (2048, bb.feature_size(size), bb.feature_size(size))


def test_checkpoint_round_trip(tmp_path, model):
    r = tiny_recipe()
    batch = make_batch()
    save_checkpoint(model, r, tmp_path / "run" / "best")
    for path in (tmp_path / "run" / "best", tmp_path / "run"):  # checkpoint or run folder
        loaded, r2 = load_checkpoint(path)
        assert r2 == r and not loaded.training
        a, b = run(model, batch), run(loaded, batch)
        assert torch.equal(a.pred_boxes, b.pred_boxes)
        assert torch.equal(a.student_img, b.student_img)


def test_checkpoint_into_other_architecture_fails(tmp_path, model):
    save_checkpoint(model, tiny_recipe(), tmp_path / "ck")
    other = build_model(tiny_recipe(model={"fusion_layers": 3}), load_weights=False)
    with pytest.raises(VGError, match=r"missing fusion\.layers\.2\."):
        load_model_weights(other, tmp_path / "ck")
    wider = build_model(tiny_recipe(model={"enc_ffn": 96}), load_weights=False)
    with pytest.raises(VGError, match=r"shape mismatch visual\.encoder\.layers\.0\.linear1"):
        load_model_weights(wider, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    # Caught by the recorded SHA-256 ("damaged") where the checkpoint has one, else "corrupt".
    with pytest.raises(VGError, match="corrupt|damaged"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(VGError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_bf16_autocast_close_to_fp32(model):
    batch = make_batch()
    ref = run(model, batch).pred_boxes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, batch, return_attention=True)
        t_img, t_txt = torch.randn(B, 64), torch.randn(B, 64)
        loss, _ = total_loss(out, batch["boxes"], t_img, t_txt, tiny_recipe().distill)
    assert out.pred_boxes.dtype == torch.float32 and torch.isfinite(loss)
    assert (out.pred_boxes - ref).abs().max() < 0.02


def test_swin_backbone_grid():
    from vgdistill.models.backbones import Backbone

    bb = Backbone("swin_t")
    assert bb.num_channels == 768 and not bb.is_cnn
    with torch.no_grad():
        out = bb(torch.zeros(1, 3, 96, 96))
    assert out.shape == (1, 768, bb.feature_size(96), bb.feature_size(96)) == (1, 768, 3, 3)


def test_tokenizers_are_offline():
    from vgdistill.models.factory import build_tokenizer

    bert_base = build_tokenizer(tiny_recipe(model={"text_model": "bert-base-uncased"}).model)
    enc = bert_base(["The man on the LEFT"], padding="max_length", max_length=8, truncation=True)
    # bert-base-uncased ids: [CLS] the man on the left [SEP] [PAD]
    assert enc["input_ids"][0] == [101, 1996, 2158, 2006, 1996, 2187, 102, 0]
    with pytest.raises(VGError, match="text_layer = 12"):
        build_model(tiny_recipe(model={"text_layer": 12, "text_config": {}}), load_weights=False)


def test_embed_init_std_sets_the_reg_token_and_position_scale():
    default = build_model(tiny_recipe(), load_weights=False)
    small = build_model(tiny_recipe(model={"embed_init_std": 0.02}), load_weights=False)
    # TransVG's nn.Embedding default is N(0, 1); the recipe key scales both tables.
    assert 0.8 < default.vl_pos_embed.weight.std().item() < 1.2
    for table in (small.reg_token.weight, small.vl_pos_embed.weight):
        assert 0.015 < table.std().item() < 0.025


def test_sine_fusion_positions_start_from_detr_sine_embedding_of_the_grid():
    from vgdistill.models.layers import sine_position_embedding

    r = tiny_recipe(model={"embed_init_std": 0.02, "fusion_pos_init": "sine"})
    m = build_model(r, load_weights=False)
    side, table = m.feature_side, m.vl_pos_embed.weight
    grid = sine_position_embedding(torch.zeros(1, side, side, dtype=torch.bool), table.shape[1])
    assert torch.equal(table[-side * side :], grid[0])
    # Neighbouring cells start closer than distant ones; [REG] and text slots stay small.
    assert (table[-side * side] - table[-side * side + 1]).norm() < (
        table[-side * side] - table[-1]
    ).norm()
    assert table[: 1 + r.data.max_query_len].std() < 0.05
    assert table.requires_grad  # a starting point, still learned
    with pytest.raises(VGError, match="fusion_pos_init"):
        tiny_recipe(model={"fusion_pos_init": "cosine"})


def test_frozen_parts_stay_in_eval_mode_while_training():
    r = tiny_recipe(train={"lr_backbone": 0.0, "lr_encoder": 0.0, "lr_text": 1e-4})
    m = build_model(r, load_weights=False)
    m.param_groups(r.train)  # applies the freezing
    m.train()
    assert not m.visual.backbone.training and not m.visual.encoder.training
    assert m.text.training and m.fusion.training
    # BatchNorm statistics of the frozen backbone do not move in a training forward.
    stats = {k: v.clone() for k, v in m.visual.backbone.state_dict().items()}
    run(m, make_batch())
    assert all(torch.equal(v, m.visual.backbone.state_dict()[k]) for k, v in stats.items())
    m.eval()
    assert not m.fusion.training


def test_cached_visual_tokens_give_the_same_prediction(model):
    batch = make_batch()
    tokens, pad, _ = model.visual(batch["image"], batch["image_mask"].bool())
    direct = run(model, batch)
    cached = model(None, None, batch["input_ids"], batch["attention_mask"], visual=(tokens, pad))
    assert torch.equal(direct.pred_boxes, cached.pred_boxes)
    assert torch.equal(direct.student_img, cached.student_img)
