"""Convert a checkpoint of the TransVG reference code (djiajunustc/TransVG) to vgdistill.

TransVG's `model.state_dict()` layout (train.py saves it under 'model', beside 'args'):
  visumodel.backbone.0.body.*            torchvision ResNet with FrozenBatchNorm2d
  visumodel.input_proj.*                 1x1 conv to hidden_dim
  visumodel.transformer.encoder.layers.N.*  DETR encoder layers (nn.MultiheadAttention)
  textmodel.bert.*                       pytorch_pretrained_bert BertModel (+ pooler)
  visu_proj.*, text_proj.*, reg_token.weight, vl_pos_embed.weight
  vl_transformer.encoder.layers.N.*      fusion layers
  bbox_embed.layers.{0,1,2}.*            box MLP
The architecture (backbone depth, widths, layer counts, BERT shape) is read from tensor
shapes; sizes the shapes cannot tell (heads, bert_enc_num, image size, max_query_len) come
from the saved 'args' when present, else from the recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from vgdistill.errors import VGError

log = logging.getLogger("vgdistill")

PREFIXES = (
    ("visumodel.backbone.0.body.", "visual.backbone.body."),
    ("visumodel.input_proj.", "visual.input_proj."),
    ("visumodel.transformer.encoder.layers.", "visual.encoder.layers."),
    ("textmodel.bert.", "text.bert."),
    ("vl_transformer.encoder.layers.", "fusion.layers."),
    ("visu_proj.", "visu_proj."),
    ("text_proj.", "text_proj."),
    ("reg_token.", "reg_token."),
    ("vl_pos_embed.", "vl_pos_embed."),
    ("bbox_embed.", "bbox_embed."),
)
RESNET_LAYER3_BLOCKS = {6: "resnet50", 23: "resnet101"}


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _need(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise VGError(f"not a TransVG checkpoint: key {key!r} is missing")
    return state[key]


def infer_architecture(state: dict[str, Tensor], args: Any) -> dict[str, Any]:
    """Architecture facts of a TransVG state dict (+ its saved argparse args, if any)."""
    if not any(k.startswith("visumodel.") for k in state):
        held = ", ".join(list(state)[:3]) + (", ..." if len(state) > 3 else "")
        raise VGError(
            f"not a TransVG checkpoint: no visumodel.* tensors (it holds {held}); "
            "give a TransVG best_checkpoint.pth"
        )
    blocks = _count(state, "visumodel.backbone.0.body.layer3.")
    if blocks not in RESNET_LAYER3_BLOCKS:
        raise VGError(
            f"not a TransVG ResNet-50/101 checkpoint (layer3 has {blocks} blocks, "
            "expected 6 or 23; keys visumodel.backbone.0.body.*)"
        )
    if getattr(args, "dilation", False):
        raise VGError("TransVG checkpoints with --dilation (DC5 backbone) are not supported")
    if getattr(args, "position_embedding", "sine") not in ("sine", "v2"):
        raise VGError("only TransVG checkpoints with the sine position embedding are supported")
    hidden = _need(state, "visumodel.input_proj.weight").shape[0]
    vl_hidden = _need(state, "vl_pos_embed.weight").shape[1]
    if hidden != vl_hidden:
        raise VGError(f"hidden_dim {hidden} != vl_hidden_dim {vl_hidden}: not supported")
    enc_layers = _count(state, "visumodel.transformer.encoder.layers.")
    fusion_layers = _count(state, "vl_transformer.encoder.layers.")
    if enc_layers == 0:
        raise VGError(
            "TransVG checkpoints without a DETR encoder (detr_enc_num 0) are not supported"
        )
    bert_layers = _count(state, "textmodel.bert.encoder.layer.")
    word = _need(state, "textmodel.bert.embeddings.word_embeddings.weight")
    bert = {
        "vocab_size": word.shape[0],
        "hidden_size": word.shape[1],
        "num_hidden_layers": bert_layers,
        # BERT checkpoints use 64-wide heads (base: 12 x 64, large: 16 x 64).
        "num_attention_heads": max(1, word.shape[1] // 64),
        "intermediate_size": _need(
            state, "textmodel.bert.encoder.layer.0.intermediate.dense.weight"
        ).shape[0],
        "max_position_embeddings": _need(
            state, "textmodel.bert.embeddings.position_embeddings.weight"
        ).shape[0],
        "type_vocab_size": _need(
            state, "textmodel.bert.embeddings.token_type_embeddings.weight"
        ).shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    }
    return {
        "backbone": RESNET_LAYER3_BLOCKS[blocks],
        "hidden_dim": hidden,
        "enc_layers": enc_layers,
        "enc_ffn": _need(state, "visumodel.transformer.encoder.layers.0.linear1.weight").shape[0],
        "fusion_layers": fusion_layers,
        "fusion_ffn": _need(state, "vl_transformer.encoder.layers.0.linear1.weight").shape[0]
        if fusion_layers
        else 0,
        "num_tokens": state["vl_pos_embed.weight"].shape[0],
        "bert": bert,
    }


def map_state_dict(
    state: dict[str, Tensor], text_layer: int
) -> tuple[dict[str, Tensor], list[str]]:
    """TransVG keys -> vgdistill keys; returns (mapped, skipped keys).

    Skipped: BERT's pooler and the BERT layers after text_layer (TransVG stores them but never
    uses them), position_ids buffers.
    """
    mapped, skipped = {}, []
    layer = re.compile(r"text\.bert\.encoder\.layer\.(\d+)\.")
    for key, value in state.items():
        for src, dst in PREFIXES:
            if key.startswith(src):
                new = dst + key[len(src) :]
                break
        else:
            raise VGError(f"not a TransVG checkpoint: unexpected key {key!r}")
        # Older pytorch_pretrained_bert releases named LayerNorm parameters gamma/beta.
        new = new.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        m = layer.match(new)
        if (
            new.startswith("text.bert.pooler.")
            or new.endswith(("position_ids", "num_batches_tracked"))
            or (m and int(m.group(1)) >= text_layer)
        ):
            skipped.append(key)
            continue
        mapped[new] = value
    return mapped, skipped


def _read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], Any]:
    """(state dict, the reference's argparse args or None) of a TransVG checkpoint file."""
    from vgdistill.models.files import load_torch_file, unwrap_state_dict

    if ckpt.suffix == ".safetensors":
        from vgdistill.models.files import load_safetensors_file

        raw: Any = load_safetensors_file(ckpt)
    else:
        raw = load_torch_file(ckpt)
    args = raw.get("args") if isinstance(raw, dict) else None
    return unwrap_state_dict(raw, str(ckpt)), args


def _imported_recipe(recipe: Any, arch: dict[str, Any], args: Any, ckpt: Path) -> Any:
    """`recipe` with the architecture, input size and query length the checkpoint fixes."""
    from vgdistill.recipe import validate

    m, data = recipe.model, recipe.data
    data_cfg = dataclasses.replace(
        data,
        image_size=int(getattr(args, "imsize", data.image_size)),
        max_query_len=int(getattr(args, "max_query_len", data.max_query_len)),
    )
    side = -(-data_cfg.image_size // 32)
    expected = 1 + data_cfg.max_query_len + side * side
    if expected != arch["num_tokens"]:
        raise VGError(
            f"{ckpt}: vl_pos_embed has {arch['num_tokens']} rows but image_size "
            f"{data_cfg.image_size} and max_query_len {data_cfg.max_query_len} give {expected}; "
            "set data.image_size / data.max_query_len to the values it was trained with "
            "(RefCOCOg checkpoints use max_query_len 40)"
        )
    text_layer = int(getattr(args, "bert_enc_num", m.text_layer))
    n_bert = arch["bert"]["num_hidden_layers"]
    if not 1 <= text_layer <= n_bert:
        raise VGError(
            f"BERT layer {text_layer} (args.bert_enc_num, else model.text_layer) is outside "
            f"1..{n_bert}; set model.text_layer"
        )
    model_cfg = dataclasses.replace(
        m,
        backbone=arch["backbone"],
        backbone_weights="",
        detr_checkpoint="",
        hidden_dim=arch["hidden_dim"],
        enc_layers=arch["enc_layers"],
        enc_ffn=arch["enc_ffn"],
        enc_heads=int(getattr(args, "nheads", m.enc_heads)),
        fusion_layers=arch["fusion_layers"],
        fusion_ffn=arch["fusion_ffn"],
        fusion_heads=int(getattr(args, "vl_nheads", m.fusion_heads)),
        text_layer=text_layer,
        text_config={},
    )
    recipe = dataclasses.replace(recipe, model=model_cfg, data=data_cfg)
    validate(recipe, str(ckpt))
    return recipe


def import_transvg(ckpt: str | Path, out: str | Path, recipe: Any | None = None) -> dict[str, Any]:
    """Convert TransVG checkpoint `ckpt` into a vgdistill checkpoint folder `out`.

    `recipe` supplies everything the checkpoint does not fix (tokenizer, distillation,
    training settings); architecture fields are overwritten from the checkpoint.
    Returns a summary dict (architecture, counts of mapped and skipped tensors).
    """
    from vgdistill.models.checkpoint import check_state_dict, save_checkpoint
    from vgdistill.models.factory import build_model
    from vgdistill.recipe import from_dict

    ckpt = Path(ckpt)
    state, args = _read_checkpoint(ckpt)
    try:
        arch = infer_architecture(state, args)
    except VGError as e:
        raise VGError(f"{ckpt}: {e}") from None
    recipe = _imported_recipe(recipe or from_dict({}, "<defaults>"), arch, args, ckpt)
    text_layer = recipe.model.text_layer
    mapped, skipped = map_state_dict(state, text_layer)
    bert_cfg = dict(arch["bert"], num_hidden_layers=text_layer)
    model = build_model(recipe, load_weights=False, bert_config=bert_cfg)
    check_state_dict(model, mapped, str(ckpt), allow_missing=("distill_",))
    model.load_state_dict(mapped, strict=False)
    save_checkpoint(model, recipe, out)
    log.debug("skipped TransVG keys: %s", ", ".join(skipped))
    return {
        "backbone": arch["backbone"],
        "hidden_dim": arch["hidden_dim"],
        "enc_layers": arch["enc_layers"],
        "fusion_layers": arch["fusion_layers"],
        "text_layer": text_layer,
        "image_size": recipe.data.image_size,
        "max_query_len": recipe.data.max_query_len,
        "mapped": len(mapped),
        "skipped": len(skipped),
        "distill_modality": recipe.distill.modality,
    }
