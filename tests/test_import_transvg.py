"""`vgdistill import transvg`: a state dict with TransVG's key names and shapes (a tiny config
of the reference architecture) converts into a checkpoint that predicts the same boxes.

The expected boxes come from an independent forward pass written below from TransVG's
reference code (models/trans_vg.py, visual_model/detr.py + backbone.py + transformer.py +
position_encoding.py, language_model/bert.py, vl_transformer.py in djiajunustc/TransVG):
torchvision ResNet-50 with FrozenBatchNorm2d, nn.MultiheadAttention encoder layers on
sequence-first tensors, DETR's sine embedding, a full Hugging Face BertModel whose hidden
state `bert_enc_num` is read, and the [REG] / text / visual token order. Two deliberate
differences from the original stack, neither of which changes the boxes:
- pytorch_pretrained_bert masks padded keys with -10000, Hugging Face with -inf/min; both
  give exactly zero attention weight in float32;
- TransVG pads images with 0 after normalisation, which is what the input here holds.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vgdistill.cli.app import app  # noqa: E402
from vgdistill.models.checkpoint import load_checkpoint  # noqa: E402

HID, HEADS, FFN, ENC, FUSION = 32, 4, 64, 1, 2
IMSIZE, QLEN, BERT_ENC_NUM = 64, 8, 2
N_VIS = (IMSIZE // 32) ** 2


class RefEncoderLayer(nn.Module):
    """DETR / TransVG TransformerEncoderLayer.forward_post, sequence-first."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(HID, HEADS, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(HID, FFN), nn.Linear(FFN, HID)
        self.norm1, self.norm2 = nn.LayerNorm(HID), nn.LayerNorm(HID)

    def forward(self, src, key_padding_mask, pos):
        q = k = src + pos
        src = self.norm1(
            src + self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask)[0]
        )
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def ref_sine(mask, num_pos_feats):
    """DETR PositionEmbeddingSine(num_pos_feats, normalize=True) -> [B, 2F, h, w]."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    px, py = x[:, :, :, None] / dim_t, y[:, :, :, None] / dim_t
    px = torch.stack((px[:, :, :, 0::2].sin(), px[:, :, :, 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[:, :, :, 0::2].sin(), py[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class RefTransVG(nn.Module):
    """The reference TransVG, module for module, with the reference's state-dict names."""

    def __init__(self):
        import torchvision
        from torchvision.ops.misc import FrozenBatchNorm2d
        from transformers import BertConfig, BertModel

        super().__init__()
        net = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        self.body = nn.Sequential(
            *[
                getattr(net, n)
                for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
            ]
        )
        self.body_names = net  # for the state-dict names (conv1, layer1.0.conv1, ...)
        self.input_proj = nn.Conv2d(2048, HID, 1)
        self.enc = nn.ModuleList(RefEncoderLayer() for _ in range(ENC))
        cfg = BertConfig(
            hidden_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
        )
        cfg._attn_implementation = "eager"
        self.bert = BertModel(cfg)  # with pooler, as pytorch_pretrained_bert
        self.visu_proj, self.text_proj = nn.Linear(HID, HID), nn.Linear(128, HID)
        self.reg_token = nn.Embedding(1, HID)
        self.vl_pos_embed = nn.Embedding(1 + QLEN + N_VIS, HID)
        self.vl = nn.ModuleList(RefEncoderLayer() for _ in range(FUSION))
        self.bbox = nn.ModuleList([nn.Linear(HID, HID), nn.Linear(HID, HID), nn.Linear(HID, 4)])
        with torch.no_grad():  # BatchNorm statistics that keep ResNet activations in range
            for m in net.modules():
                if isinstance(m, FrozenBatchNorm2d):
                    m.weight.uniform_(0.2, 0.4)
                    m.bias.uniform_(-0.1, 0.1)
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
            for layer in [*self.enc, *self.vl]:
                layer.self_attn.in_proj_bias.uniform_(-0.1, 0.1)

    def transvg_state_dict(self):
        """The keys TransVG's model.state_dict() has."""
        sd = {}
        body = {k: v for k, v in self.body_names.state_dict().items() if not k.startswith("fc.")}
        sd.update({f"visumodel.backbone.0.body.{k}": v for k, v in body.items()})
        sd.update({f"visumodel.input_proj.{k}": v for k, v in self.input_proj.state_dict().items()})
        for i, layer in enumerate(self.enc):
            for k, v in layer.state_dict().items():
                sd[f"visumodel.transformer.encoder.layers.{i}.{k}"] = v
        bert = {k: v for k, v in self.bert.state_dict().items() if "position_ids" not in k}
        sd.update({f"textmodel.bert.{k}": v for k, v in bert.items()})
        for name in ("visu_proj", "text_proj", "reg_token", "vl_pos_embed"):
            sd.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        for i, layer in enumerate(self.vl):
            for k, v in layer.state_dict().items():
                sd[f"vl_transformer.encoder.layers.{i}.{k}"] = v
        for i, lin in enumerate(self.bbox):
            for k, v in lin.state_dict().items():
                sd[f"bbox_embed.layers.{i}.{k}"] = v
        return {k: v.clone() for k, v in sd.items()}

    def forward(self, img, img_mask, ids, word_mask):
        """TransVG.forward (trans_vg.py) with DETR.forward and BERT.forward inlined."""
        bs = img.shape[0]
        feat = self.body(img)
        mask = F.interpolate(img_mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
        pos = ref_sine(mask, HID // 2).flatten(2).permute(2, 0, 1)
        src = self.input_proj(feat).flatten(2).permute(2, 0, 1)
        visu_mask = mask.flatten(1)
        for layer in self.enc:
            src = layer(src, visu_mask, pos)
        visu_src = self.visu_proj(src)
        hidden = self.bert(ids, attention_mask=word_mask, output_hidden_states=True).hidden_states
        text_src = self.text_proj(hidden[BERT_ENC_NUM]).permute(1, 0, 2)
        text_mask = ~word_mask.to(torch.bool)
        tgt_src = self.reg_token.weight.unsqueeze(1).repeat(1, bs, 1)
        tgt_mask = torch.zeros((bs, 1), dtype=torch.bool)
        vl_src = torch.cat([tgt_src, text_src, visu_src], dim=0)
        vl_mask = torch.cat([tgt_mask, text_mask, visu_mask], dim=1)
        vl_pos = self.vl_pos_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        for layer in self.vl:
            vl_src = layer(vl_src, vl_mask, vl_pos)
        x = vl_src[0]
        for i, lin in enumerate(self.bbox):
            x = F.relu(lin(x)) if i < 2 else lin(x)
        return x.sigmoid()


def inputs():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(2, 3, IMSIZE, IMSIZE, generator=g)
    img_mask = torch.zeros(2, IMSIZE, IMSIZE, dtype=torch.bool)
    img_mask[0, 40:, :] = True  # bottom padding (TransVG pads with zeros)
    img_mask[1, :, 20:] = True
    img = img.masked_fill(img_mask[:, None], 0.0)
    ids = torch.randint(1000, 5000, (2, QLEN), generator=g)
    word_mask = torch.ones(2, QLEN, dtype=torch.long)
    word_mask[0, 5:] = 0
    word_mask[1, 3:] = 0
    ids[word_mask == 0] = 0
    return img, img_mask, ids, word_mask


def transvg_args():
    return argparse.Namespace(
        imsize=IMSIZE,
        max_query_len=QLEN,
        bert_enc_num=BERT_ENC_NUM,
        nheads=HEADS,
        vl_nheads=HEADS,
        dilation=False,
        position_embedding="sine",
        backbone="resnet50",
        hidden_dim=HID,
        vl_hidden_dim=HID,
        detr_enc_num=ENC,
        lr=1e-4,
        device="cuda",
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    ref = RefTransVG().eval()
    root = tmp_path_factory.mktemp("transvg")
    ckpt = root / "best_checkpoint.pth"
    # What TransVG's train.py saves: model, optimizer, lr_scheduler, epoch, args, val_accu.
    torch.save(
        {
            "model": ref.transvg_state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "lr_scheduler": {"last_epoch": 3},
            "epoch": 3,
            "args": transvg_args(),
            "val_accu": np.float64(0.5),
        },
        ckpt,
    )
    return ref, ckpt


def test_import_gives_same_boxes(reference, tmp_path):
    ref, ckpt = reference
    out = tmp_path / "imported"
    result = CliRunner().invoke(app, ["import", "transvg", str(ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resnet50" in result.output and "BERT layer 2" in result.output
    model, recipe = load_checkpoint(out)
    assert recipe.model.backbone == "resnet50" and recipe.model.text_layer == BERT_ENC_NUM
    assert (recipe.data.image_size, recipe.data.max_query_len) == (IMSIZE, QLEN)
    assert len(model.text.bert.encoder.layer) == BERT_ENC_NUM  # unused layer 3 dropped
    img, img_mask, ids, word_mask = inputs()
    with torch.no_grad():
        want = ref(img, img_mask, ids, word_mask)
        got = model(img, img_mask, ids, word_mask).pred_boxes
    assert want.std() > 1e-3  # the boxes differ between the two samples: a real comparison
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_import_without_args_uses_recipe(reference, tmp_path):
    ref, ckpt = reference
    bare = tmp_path / "bare.pth"
    torch.save(ref.transvg_state_dict(), bare)  # a plain state dict, no 'args'
    runner = CliRunner()
    res = runner.invoke(app, ["import", "transvg", str(bare), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "vl_pos_embed has 13 rows" in res.output
    res = runner.invoke(
        app,
        [
            "import",
            "transvg",
            str(bare),
            "--out",
            str(tmp_path / "b"),
            "--set",
            f"data.image_size={IMSIZE}",
            "--set",
            f"data.max_query_len={QLEN}",
            "--set",
            f"model.text_layer={BERT_ENC_NUM}",
            "--set",
            f"model.enc_heads={HEADS}",
            "--set",
            f"model.fusion_heads={HEADS}",
            "--set",
            "distill.modality=none",
        ],
    )
    assert res.exit_code == 0, res.output
    model, _ = load_checkpoint(tmp_path / "b")
    img, img_mask, ids, word_mask = inputs()
    with torch.no_grad():
        assert torch.allclose(
            model(img, img_mask, ids, word_mask).pred_boxes,
            ref(img, img_mask, ids, word_mask),
            atol=1e-5,
        )


def test_import_refuses_bad_files(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "not_transvg.pth"
    torch.save({"model": {"conv.weight": torch.zeros(2)}}, bad)
    res = runner.invoke(app, ["import", "transvg", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a TransVG" in res.output
    res = runner.invoke(
        app, ["import", "transvg", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "not found" in res.output
    assert not (tmp_path / "o").exists()
