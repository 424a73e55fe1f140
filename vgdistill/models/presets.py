"""Named model presets: partial `[model]` sections that a recipe's values override.

Kept free of torch imports so that reading a recipe (and `vgdistill --help`) stays fast.
"""

from __future__ import annotations

from typing import Any

# TransVG as published: ResNet-50 + DETR encoder (6 layers, d=256), BERT-base, 6-layer fusion.
TRANSVG_R50: dict[str, Any] = {
    "backbone": "resnet50",
    "hidden_dim": 256,
    "enc_layers": 6,
    "fusion_layers": 6,
    "text_model": "bert-base-uncased",
    "text_layer": 12,
}

PRESETS: dict[str, dict[str, Any]] = {
    "transvg_r50": TRANSVG_R50,
    "transvg_r101": {**TRANSVG_R50, "backbone": "resnet101"},
    "transvg_swin_s": {**TRANSVG_R50, "backbone": "swin_s"},
    # Small enough to train on a laptop CPU in minutes: the demo and the test suite use it.
    "tiny": {
        "backbone": "tiny_cnn",
        "backbone_weights": "",
        "detr_checkpoint": "",
        "hidden_dim": 64,
        "enc_layers": 1,
        "enc_heads": 4,
        "enc_ffn": 128,
        "fusion_layers": 2,
        "fusion_heads": 4,
        "fusion_ffn": 128,
        "dropout": 0.0,
        "text_model": "minilm",
        "text_init": "random",
        "text_layer": 2,
        "text_config": {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 128,
        },
    },
}
