"""The recipe schema: one dataclass per TOML section, each field with its help text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) kept in metadata."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# TransVG's training augmentations, each of which `data.augment_ops` can leave out.
AUGMENTATIONS = ("resize", "crop", "jitter", "flip", "translate")
# How the training crop treats the target box: kept whole, or the TransVG reference's crop.
CROPS = ("whole", "transvg")


@dataclass
class DataConfig:
    """Where the prepared dataset lives and how samples are turned into tensors."""

    path: str = _f("data/refcoco", "Folder written by `vgdistill prepare`.")
    train_split: str = _f("train", "Split used for training.")
    val_split: str = _f("val", "Split used to pick the best checkpoint.")
    image_size: int = _f(640, "Images are resized and padded to this square size.")
    max_query_len: int = _f(20, "Phrases are tokenized to this many tokens ([CLS]+...+[SEP]).")
    augment: bool = _f(True, "TransVG augmentation (resize/crop, colour jitter, flip) in training.")
    augment_ops: list[str] = _f(
        list(AUGMENTATIONS),
        "Which augmentations `augment` applies: resize, crop, jitter, flip, translate.",
    )
    crop: str = _f(
        "whole",
        "The training crop: 'whole' keeps the whole target box inside it; 'transvg' is the "
        "reference's (its box-centre test swaps x and y, so it can cut the box).",
        CROPS,
    )
    num_workers: int = _f(4, "DataLoader worker processes per training process.")


@dataclass
class ModelConfig:
    """The TransVG student. A preset fills every key the recipe leaves out."""

    preset: str = _f(
        "transvg_r50", "Named preset (transvg_r50, transvg_r101, transvg_swin_s, tiny)."
    )
    backbone: str = _f(
        "resnet50",
        "Visual backbone.",
        ("resnet50", "resnet101", "swin_t", "swin_s", "swin_b", "tiny_cnn"),
    )
    backbone_weights: str = _f(
        "",
        "Torchvision weight name (e.g. IMAGENET1K_V1) or a local .pth/.safetensors; '' = random.",
    )
    detr_checkpoint: str = _f(
        "",
        "Local DETR checkpoint to start the visual branch from: facebookresearch/detr's "
        "layout, or the detr.safetensors that `vgdistill detector` writes.",
    )
    detr_source: str = _f(
        "",
        "Where model.detr_checkpoint is published; training stops before it starts, quoting "
        "this, when that file is missing.",
    )
    hidden_dim: int = _f(256, "Width of the DETR encoder and the fusion transformer.")
    enc_layers: int = _f(6, "DETR encoder layers.")
    enc_heads: int = _f(8, "DETR encoder attention heads.")
    enc_ffn: int = _f(2048, "DETR encoder feed-forward width.")
    fusion_layers: int = _f(6, "Visual-linguistic fusion transformer layers.")
    fusion_heads: int = _f(8, "Fusion transformer attention heads.")
    fusion_ffn: int = _f(2048, "Fusion transformer feed-forward width.")
    dropout: float = _f(0.1, "Dropout in the encoder and fusion transformers.")
    embed_init_std: float = _f(
        1.0, "Initial std of the [REG] token and fusion position embedding (TransVG: 1.0)."
    )
    fusion_pos_init: str = _f(
        "random",
        "How the fusion position embedding's visual slots start: 'random' (TransVG, "
        "embed_init_std) or 'sine' (DETR's 2-D sine embedding of the feature grid).",
        ("random", "sine"),
    )
    text_model: str = _f(
        "bert-base-uncased", "BERT name or local folder; 'minilm' = the offline all-MiniLM-L6-v2."
    )
    text_init: str = _f(
        "pretrained",
        "'pretrained' loads the weights; 'random' builds from its config.",
        ("pretrained", "random"),
    )
    text_config: dict[str, int] = _f({}, "BertConfig overrides when text_init = 'random'.")
    text_layer: int = _f(12, "Use the hidden state of this BERT encoder layer (bert_enc_num).")
    channels_last: bool = _f(True, "channels_last memory format for CNN backbones (faster on GPU).")
    init_from: str = _f(
        "",
        "Start from this vgdistill checkpoint or run folder (every tensor whose name and shape "
        "match); backbone_weights, detr_checkpoint and BERT's weights are then not read.",
    )


@dataclass
class DistillConfig:
    """EpmVG cross-modal distillation from a CLIP teacher."""

    modality: str = _f(
        "both",
        "Which teacher embeddings to distil; 'none' = TransVG baseline.",
        ("both", "image", "text", "none"),
    )
    position: str = _f(
        "fusion",
        "Student features distilled: fusion output, branch projections, branch outputs "
        "(DETR encoder / BERT), or nearest the input (CNN map / BERT embeddings).",
        ("fusion", "linear", "backbone", "cnn"),
    )
    loss: str = _f("cosine", "Distillation loss.", ("cosine", "l1", "mse"))
    alpha: float = _f(1.5, "Weight of the image distillation loss.")
    beta: float = _f(2.0, "Weight of the text distillation loss.")
    pool: str = _f(
        "first", "Student token used: the first one (paper) or the mean.", ("first", "mean")
    )
    teacher: str = _f(
        "ViT-B-16", "open_clip model name (or a folder written by `vgdistill teacher`)."
    )
    teacher_pretrained: str = _f("openai", "open_clip pretrained tag or local checkpoint file.")
    teacher_arch: str = _f(
        "", "open_clip model `vgdistill teacher` fits when distill.teacher is its output folder."
    )
    teacher_trainable: bool = _f(False, "Train the teacher too (an ablation; frozen is the paper).")
    teacher_lr: float = _f(1e-5, "Teacher learning rate when teacher_trainable.")
    teacher_precision: str = _f(
        "auto", "Teacher precision: 'auto' = bf16 on GPU, fp32 on CPU.", ("auto", "fp32", "bf16")
    )
    teacher_view: str = _f(
        "padded",
        "What the teacher sees: the student's padded square, or the image region alone "
        "(padding cut off), resized and normalised the teacher's way.",
        ("padded", "image"),
    )


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging."""

    seed: int = _f(13, "Random seed (TransVG uses 13).")
    epochs: int = _f(90, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = _f(0, "Stop after this many optimiser steps; 0 = use epochs.")
    batch_size: int = _f(8, "Batch size per process (TransVG: 8 per GPU x 8 GPUs).")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    lr: float = _f(1e-4, "Learning rate of the fusion transformer, head and projections.")
    lr_backbone: float = _f(1e-5, "Backbone learning rate; 0 freezes it.")
    lr_encoder: float = _f(1e-5, "DETR encoder learning rate; 0 freezes it.")
    lr_text: float = _f(1e-5, "BERT learning rate; 0 freezes it.")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    clip_grad: float = _f(0.0, "Clip the gradient norm to this value; 0 = off.")
    scheduler: str = _f("step", "LR schedule.", ("step", "cosine", "poly", "constant"))
    lr_drop: int = _f(60, "Step schedule: multiply the lr by 0.1 after this many epochs.")
    warmup_steps: int = _f(0, "Linear warm-up steps (cosine and poly schedules).")
    mixed_precision: str = _f(
        "no",
        "Autocast precision; 'auto' = what `accelerate launch` / `accelerate config` says, "
        "else bf16 on a GPU that has it.",
        ("no", "bf16", "fp16", "auto"),
    )
    compile: bool = _f(False, "torch.compile the student.")
    visual_cache_gb: float = _f(
        4.0,
        "Memory for computing a frozen visual branch (lr_backbone = lr_encoder = 0, augment_ops "
        "at most ['flip']) once per image instead of every step; 0 = off.",
    )
    eval_every: int = _f(1, "Evaluate on the validation split every N epochs.")
    log_every: int = _f(10, "Log metrics every N optimiser steps.")
    save_every: int = _f(0, "Also save a resumable checkpoint every N steps; 0 = each epoch.")
    keep: int = _f(2, "Keep at most this many resumable checkpoints.")
    trackers: list[str] = _f([], "Accelerate trackers, e.g. ['tensorboard'].")
    project: str = _f(
        "vgdistill", "Tracker project (W&B project, MLflow experiment); runs are named by folder."
    )


@dataclass
class EvalConfig:
    """Evaluation splits and batch size."""

    splits: list[str] = _f(["val", "testA", "testB"], "Splits evaluated by `vgdistill eval`.")
    batch_size: int = _f(32, "Evaluation batch size per process.")
    protocol: str = _f(
        "transvg",
        "How boxes are scored: 'transvg' = the reference's IoU in the padded, normalised "
        "square (prediction clamped to the square, integer ground truth); 'pixels' = IoU in "
        "original image pixels (prediction clamped to the image).",
        ("transvg", "pixels"),
    )


@dataclass
class DetectorConfig:
    """`vgdistill detector`: the grid detector that pretrains the visual branch.

    Its seed is train.seed.
    """

    steps: int = _f(600, "Optimiser steps.")
    batch_size: int = _f(64, "Images per step.")
    lr: float = _f(2e-3, "AdamW learning rate (warm-up, then cosine decay).")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    warmup_steps: int = _f(30, "Linear warm-up steps.")


@dataclass
class TeacherConfig:
    """`vgdistill teacher`: fitting the CLIP teacher contrastively (seed: train.seed)."""

    epochs: int = _f(6, "Passes over the training pairs.")
    batch_size: int = _f(128, "Pairs per contrastive batch (at most one per image).")
    lr: float = _f(2e-3, "AdamW learning rate (warm-up, then cosine decay).")
    weight_decay: float = _f(0.1, "AdamW weight decay.")
    warmup_steps: int = _f(20, "Linear warm-up steps.")
    grad_clip: float = _f(1.0, "Clip the gradient norm to this value; 0 = off.")


@dataclass
class DemoConfig:
    """`vgdistill demo`: how it generates its `shapes` data."""

    shapes_train_mix: str = _f(
        "natural",
        "The shapes train split the demo generates: 'natural' (as val) or 'relational'.",
        ("natural", "relational"),
    )


@dataclass
class Recipe:
    """A whole training recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what `recipe.toml` and `config.json` hold)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "distill": DistillConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "detector": DetectorConfig,
    "teacher": TeacherConfig,
    "demo": DemoConfig,
}


