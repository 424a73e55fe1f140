"""Recipes: TOML files read into typed dataclasses (`schema`), with `extends`, `--set`
overrides and validation (`load`)."""

from vgdistill.recipe.load import (
    apply_overrides,
    changed_keys,
    deep_merge,
    flat_keys,
    from_dict,
    load_recipe,
    parse_override,
    to_toml,
    valid_keys,
    validate,
)
from vgdistill.recipe.schema import (
    AUGMENTATIONS,
    SECTIONS,
    DataConfig,
    DemoConfig,
    DetectorConfig,
    DistillConfig,
    EvalConfig,
    ModelConfig,
    Recipe,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "AUGMENTATIONS",
    "SECTIONS",
    "DataConfig",
    "DemoConfig",
    "DetectorConfig",
    "DistillConfig",
    "EvalConfig",
    "ModelConfig",
    "Recipe",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "changed_keys",
    "deep_merge",
    "flat_keys",
    "from_dict",
    "load_recipe",
    "parse_override",
    "to_toml",
    "valid_keys",
    "validate",
]
