"""Recipes: TOML files read into typed dataclasses, with `extends`, `--set` overrides and
validation that names the file, the key, the expected type and the closest valid key."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from vgdistill.errors import VGError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) kept in metadata."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# TransVG's training augmentations, each of which `data.augment_ops` can leave out.
AUGMENTATIONS = ("resize", "crop", "jitter", "flip", "translate")


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
    num_workers: int = _f(4, "DataLoader worker processes per training process.")
    shapes_train_mix: str = _f(
        "natural",
        "The shapes train split `vgdistill demo` generates: 'natural' (as val) or 'relational'.",
        ("natural", "relational"),
    )


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
        "Student features distilled: fusion output, branch projections, or backbones.",
        ("fusion", "linear", "backbone"),
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
    mixed_precision: str = _f("no", "Autocast precision.", ("no", "bf16", "fp16"))
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


@dataclass
class EvalConfig:
    """Evaluation splits and batch size."""

    splits: list[str] = _f(["val", "testA", "testB"], "Splits evaluated by `vgdistill eval`.")
    batch_size: int = _f(32, "Evaluation batch size per process.")


@dataclass
class Recipe:
    """A whole training recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what `recipe.toml` and `config.json` hold)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "distill": DistillConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def valid_keys() -> list[str]:
    """Every dotted key a recipe may set, e.g. 'train.lr'."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys() + list(SECTIONS), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file and merge the chain of files it `extends`."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise VGError(f"{path}: circular 'extends' ({chain})")
    if not path.is_file():
        raise VGError(f"recipe not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise VGError(f"{path}: not valid TOML: {e}") from None
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise VGError(f"{path}: 'extends' must be a file name (str)")
    base = _read_toml(path.parent / base_name, (*seen, path))
    return deep_merge(base, raw)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; tables are merged key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k in SECTIONS:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise VGError(f"--set needs section.key=value, got {text!r}")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # bare words such as resnet50 need no quotes on the command line
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `--set` overrides to a raw recipe dict (before validation)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) != 2:
            raise VGError(f"--set {text}: key must be section.key{_suggest(parts[-1])}")
        section, key = parts
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise VGError(f"{source}: '{section}' must be a table")
        raw[section][key] = value
    return raw


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_check_type(v, item) for v in value.values())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build_section(cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise VGError(f"{source}: unknown key '{section}.{key}'{_suggest(f'{section}.{key}')}")
        tp = hints[key]
        if not _check_type(value, tp):
            raise VGError(
                f"{source}: {section}.{key} must be {_type_name(tp)}, "
                f"got {type(value).__name__} {value!r}"
            )
        kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _model_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Fill the model section from its preset; the recipe's own keys win."""
    from vgdistill.models.presets import PRESETS

    preset = values.get("preset", ModelConfig.preset)
    if preset not in PRESETS:
        raise VGError(
            f"{source}: unknown model.preset {preset!r}; valid presets: {', '.join(PRESETS)}"
        )
    return {**PRESETS[preset], **values, "preset": preset}


def from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a raw nested dict and build a Recipe."""
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise VGError(f"{source}: unknown section '{name}'{_suggest(name)}")
        if not isinstance(values, dict):
            raise VGError(f"{source}: '{name}' must be a table, e.g. [{name}]")
        if name == "model":
            values = _model_values(values, source)
        sections[name] = _build_section(SECTIONS[name], values, name, source)
    if "model" not in sections:
        sections["model"] = _build_section(ModelConfig, _model_values({}, source), "model", source)
    recipe = Recipe(**sections)
    validate(recipe, source)
    return recipe


def validate(recipe: Recipe, source: str = "<recipe>") -> None:
    """Cross-field and range checks; raises VGError naming the key."""
    for section, cls in SECTIONS.items():
        obj = getattr(recipe, section)
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            value = getattr(obj, f.name)
            if choices and value not in choices:
                raise VGError(
                    f"{source}: {section}.{f.name} = {value!r} is not one of: {', '.join(choices)}"
                )
    bad_ops = [op for op in recipe.data.augment_ops if op not in AUGMENTATIONS]
    if bad_ops:
        raise VGError(
            f"{source}: data.augment_ops holds {', '.join(map(repr, bad_ops))}; "
            f"choose from: {', '.join(AUGMENTATIONS)}"
        )
    t, d, m = recipe.train, recipe.distill, recipe.model
    non_negative = {
        "train.lr": t.lr,
        "train.lr_backbone": t.lr_backbone,
        "train.lr_encoder": t.lr_encoder,
        "train.lr_text": t.lr_text,
        "train.weight_decay": t.weight_decay,
        "train.clip_grad": t.clip_grad,
        "distill.alpha": d.alpha,
        "distill.beta": d.beta,
        "distill.teacher_lr": d.teacher_lr,
        "model.dropout": m.dropout,
        "train.max_steps": t.max_steps,
        "train.warmup_steps": t.warmup_steps,
        "train.save_every": t.save_every,
        "train.visual_cache_gb": t.visual_cache_gb,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise VGError(f"{source}: {key} must be >= 0, got {value}")
    positive = {
        "data.image_size": recipe.data.image_size,
        "data.max_query_len": recipe.data.max_query_len,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.eval_every": t.eval_every,
        "train.log_every": t.log_every,
        "train.keep": t.keep,
        "eval.batch_size": recipe.eval.batch_size,
        "model.hidden_dim": m.hidden_dim,
        "model.text_layer": m.text_layer,
        "model.embed_init_std": m.embed_init_std,
    }
    for key, value in positive.items():
        if value <= 0:
            raise VGError(f"{source}: {key} must be > 0, got {value}")
    if t.epochs <= 0 and t.max_steps <= 0:
        raise VGError(f"{source}: set train.epochs or train.max_steps to a positive number")
    if recipe.data.max_query_len < 3:
        raise VGError(f"{source}: data.max_query_len must be >= 3 ([CLS], a word, [SEP])")
    if m.hidden_dim % m.enc_heads or m.hidden_dim % m.fusion_heads:
        raise VGError(f"{source}: model.hidden_dim must be divisible by enc_heads and fusion_heads")
    if recipe.data.num_workers < 0:
        raise VGError(f"{source}: data.num_workers must be >= 0")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (following `extends`), apply `--set` overrides, validate."""
    path = Path(path)
    raw = _read_toml(path)
    raw = apply_overrides(raw, overrides or [], str(path))
    return from_dict(raw, str(path))


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML text."""
    import tomli_w

    return tomli_w.dumps(recipe.to_dict())


def help_for(dotted: str) -> str:
    """The help text of a dotted key such as 'train.lr'."""
    section, key = dotted.split(".", 1)
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f.metadata.get("help", "")
    raise KeyError(dotted)
