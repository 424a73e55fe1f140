"""Reading recipes: TOML files with `extends`, `--set` overrides and validation that names
the file, the key, the expected type and the closest valid key."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

from vgdistill.errors import VGError
from vgdistill.recipe.schema import (
    AUGMENTATIONS,
    SECTIONS,
    ModelConfig,
    Recipe,
)
from vgdistill.recipe.shipped import locate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


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
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise VGError(f"{path}: not valid TOML: {e}") from None
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise VGError(f"{path}: 'extends' must be a file name or a shipped recipe name (str)")
    try:
        base_path = locate(base_name, path.parent)  # a file beside this one, or a shipped name
    except VGError as e:
        raise VGError(f"{path}: extends {base_name!r}: {e}") from None
    base = _read_toml(base_path, (*seen, path))
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
        "detector.weight_decay": recipe.detector.weight_decay,
        "detector.warmup_steps": recipe.detector.warmup_steps,
        "teacher.weight_decay": recipe.teacher.weight_decay,
        "teacher.warmup_steps": recipe.teacher.warmup_steps,
        "teacher.grad_clip": recipe.teacher.grad_clip,
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
        "detector.steps": recipe.detector.steps,
        "detector.batch_size": recipe.detector.batch_size,
        "detector.lr": recipe.detector.lr,
        "teacher.epochs": recipe.teacher.epochs,
        "teacher.lr": recipe.teacher.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise VGError(f"{source}: {key} must be > 0, got {value}")
    if t.epochs <= 0 and t.max_steps <= 0:
        raise VGError(f"{source}: set train.epochs or train.max_steps to a positive number")
    if recipe.teacher.batch_size < 2:
        raise VGError(f"{source}: teacher.batch_size must be >= 2 (contrastive batches)")
    if recipe.data.max_query_len < 3:
        raise VGError(f"{source}: data.max_query_len must be >= 3 ([CLS], a word, [SEP])")
    if m.hidden_dim % m.enc_heads or m.hidden_dim % m.fusion_heads:
        raise VGError(f"{source}: model.hidden_dim must be divisible by enc_heads and fusion_heads")
    if recipe.data.num_workers < 0:
        raise VGError(f"{source}: data.num_workers must be >= 0")
    if not t.project.strip():
        raise VGError(f"{source}: train.project must name a tracker project, got ''")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file or shipped recipe name (following `extends`), apply `--set`
    overrides, validate."""
    path = locate(path)
    raw = _read_toml(path)
    raw = apply_overrides(raw, overrides or [], str(path))
    return from_dict(raw, str(path))


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML text."""
    import tomli_w

    return tomli_w.dumps(recipe.to_dict())


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"section.key": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{key}."))
        else:
            out[key] = v
    return out


def changed_keys(old: Recipe, new: Recipe) -> list[str]:
    """The dotted keys whose values differ between two recipes, sorted."""
    a, b = flat_keys(old.to_dict()), flat_keys(new.to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
