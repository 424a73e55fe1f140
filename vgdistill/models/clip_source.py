"""Where a CLIP teacher comes from: open_clip model names, local-dir folders and weight files.

Two settings name a teacher. Distillation reads distill.teacher (an open_clip model name or a
folder written by `vgdistill teacher`) and distill.teacher_pretrained; `vgdistill teacher`
reads distill.teacher_arch (what to fit, when distill.teacher is the folder it writes) and
`--init`. Both resolve to a `TeacherSource`, which `build_clip` turns into an open_clip model;
`write_local_dir` writes one back in open_clip's local-dir layout, which both read.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill.errors import VGError

if TYPE_CHECKING:  # torch and open_clip stay out of `vgdistill --help`
    from torch import nn

    from vgdistill.recipe import Recipe

CONFIG_DIR = Path(__file__).parent / "clip_configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# what open_clip looks for in a local-dir folder
WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".npz"}
LOCAL_DIR = "local-dir:"


@dataclass
class TeacherSource:
    """Where the teacher's architecture and starting weights come from."""

    arch: str  # open_clip model name, or "local-dir:FOLDER"
    weights: str  # "" (random), a local file or folder, or an open_clip pretrained tag
    model_cfg: dict[str, Any]
    key: str = "distill.teacher_pretrained"  # the setting that named the weights, for errors

    def describe(self) -> str:
        """Human-readable origin, e.g. 'vgd-tiny-clip (random init)'."""
        if self.arch.startswith(LOCAL_DIR):
            return f"{self.arch[len(LOCAL_DIR) :]} (local open_clip folder)"
        return f"{self.arch} ({self.weights or 'random init'})"


def open_clip_module() -> Any:
    """open_clip, with vgdistill's bundled model configs (e.g. vgd-tiny-clip) registered."""
    import open_clip

    known = set(open_clip.list_models())
    if CONFIG_DIR.is_dir() and not all(p.stem in known for p in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def is_model_name(name: str) -> bool:
    """True when `name` is a registered open_clip model name (after vgdistill's own configs)."""
    return name.replace("/", "-") in open_clip_module().list_models()


def _unknown_model(name: str, key: str) -> VGError:
    import open_clip

    close = difflib.get_close_matches(name, open_clip.list_models(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return VGError(
        f"{key} = {name!r} is not an open_clip model name{hint} nor a folder written by "
        f"`vgdistill teacher`; e.g. vgd-tiny-clip, ViT-B-16 (see open_clip.list_models())"
    )


def folder_model_config(folder: Path, key: str) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) of a local-dir folder."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise VGError(f"{key}: {folder} has no {CONFIG_FILE}: not an open_clip local-dir folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))["model_cfg"]
    except (ValueError, KeyError, TypeError) as e:
        raise VGError(f"{key}: {path} is not a valid open_clip config ({e})") from None
    if not isinstance(cfg, dict):
        raise VGError(f"{key}: {path} has no 'model_cfg'")
    return dict(cfg)


def _check_weights(folder: Path, key: str) -> None:
    # open_clip would quietly start from random weights when the folder has none
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise VGError(f"{key}: {folder} holds no open_clip weights ({WEIGHTS_FILE})")


def teacher_folder(name: str) -> Path | None:
    """The local-dir folder named by distill.teacher, or None when it is an open_clip name."""
    if name.startswith(LOCAL_DIR):
        name = name[len(LOCAL_DIR) :]
    elif name.startswith("hf-hub:"):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if "/" in name or name.startswith((".", "~")):
        raise VGError(
            f"distill.teacher: folder not found: {name} (write one with `vgdistill teacher`, "
            "or give an open_clip model name such as ViT-B-16)"
        )
    return None


def distill_source(distill_cfg: Any) -> TeacherSource:
    """The teacher that distillation uses: distill.teacher (a folder or an open_clip name),
    with distill.teacher_pretrained's weights (a folder there supplies the architecture too)."""
    folder = teacher_folder(distill_cfg.teacher)
    key = "distill.teacher"
    pretrained = distill_cfg.teacher_pretrained
    if folder is None and pretrained and Path(pretrained).expanduser().is_dir():
        folder, key = Path(pretrained).expanduser(), "distill.teacher_pretrained"
    if folder is not None:
        return TeacherSource(
            f"{LOCAL_DIR}{folder}", str(folder), folder_model_config(folder, key), key
        )
    if distill_cfg.teacher.startswith("hf-hub:"):
        raise VGError("distill.teacher: hf-hub models need a download; save them to a folder first")
    if not is_model_name(distill_cfg.teacher):
        raise _unknown_model(distill_cfg.teacher, "distill.teacher")
    arch = distill_cfg.teacher.replace("/", "-")
    return TeacherSource(arch, pretrained, open_clip_module().get_model_config(arch))


def resolve_source(recipe: Recipe, init: str | None = None) -> TeacherSource:
    """The teacher `vgdistill teacher` fits, from the recipe and the `--init` flag.

    Architecture: distill.teacher_arch if set, else distill.teacher when that is an open_clip
    model name (when distill.teacher is a folder, it is where the fitted teacher goes).
    Weights: --init, else distill.teacher_pretrained: '' = random, a local-dir folder
    (config and weights from it), a local weights file, or an open_clip tag (downloads).
    """
    open_clip = open_clip_module()
    d = recipe.distill
    weights = d.teacher_pretrained if init is None else init
    weights_key = "distill.teacher_pretrained" if init is None else "--init"
    if weights and Path(weights).is_dir():
        folder = Path(weights).resolve()
        cfg = folder_model_config(folder, weights_key)
        _check_weights(folder, weights_key)
        return TeacherSource(f"{LOCAL_DIR}{folder}", str(folder), cfg, weights_key)
    if d.teacher_arch:
        arch, key = d.teacher_arch, "distill.teacher_arch"
    elif is_model_name(d.teacher):
        arch, key = d.teacher, "distill.teacher"
    else:
        raise VGError(
            f"distill.teacher = {d.teacher!r} is the folder the fitted teacher is written to; "
            "set distill.teacher_arch to the open_clip model to fit (e.g. vgd-tiny-clip) "
            "or pass --init FOLDER"
        )
    if not is_model_name(arch):
        raise _unknown_model(arch, key)
    arch = arch.replace("/", "-")
    if weights and not Path(weights).is_file():
        if os.sep in weights or Path(weights).suffix in WEIGHT_SUFFIXES:
            raise VGError(
                f"teacher weights not found: {weights} (--init / distill.teacher_pretrained)"
            )
        if weights not in open_clip.list_pretrained_tags_by_model(arch):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise VGError(
                f"{weights!r} is neither a local file nor a pretrained tag of {arch} "
                f"(tags: {tags}); use '' to fit from scratch"
            )
    return TeacherSource(arch, weights, open_clip.get_model_config(arch), weights_key)


def build_clip(source: TeacherSource, load_weights: bool = True) -> tuple[nn.Module, Any]:
    """The open_clip model (dict output) and its tokenizer; errors become VGError.

    load_weights=False builds the architecture with random weights and reads no weight file.
    """
    open_clip = open_clip_module()
    local = source.arch.startswith(LOCAL_DIR)
    if local and load_weights:
        _check_weights(Path(source.arch[len(LOCAL_DIR) :]), source.key)
    # open_clip warns (on the root logger) that a model without weights starts random: that
    # is what '' (or load_weights=False) asks for, so keep it off the user's screen then
    quiet = not (source.weights and load_weights)
    if quiet:
        logging.disable(logging.WARNING)
    # pretrained_text=False: a config with a Hugging Face text tower must not download its
    # default weights; a full CLIP checkpoint, when given, sets every weight anyway
    if local:
        kwargs: dict[str, Any] = {"load_weights": load_weights}
    else:
        kwargs = {"pretrained": (source.weights if load_weights else "") or None}
    try:
        model = open_clip.create_model(
            source.arch, output_dict=True, pretrained_text=False, **kwargs
        )
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) stopped a pickle that wanted to build something other
        # than tensors: its code never ran.
        raise VGError(
            f"refused to load {source.weights}: it is a pickle that would run code; "
            "use .safetensors or a weights-only checkpoint"
        ) from None
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VGError(
            f"could not build teacher {source.describe()}: {first}; offline machines need "
            f"local weights ({source.key} = PATH) or '' to start from random weights"
        ) from None
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    if load_weights:
        _verify_weights(source)
    return model, open_clip.get_tokenizer(source.arch)


def _verify_weights(source: TeacherSource) -> None:
    """Refuse teacher weights whose bytes changed since `write_local_dir` recorded their
    SHA-256 (checked after open_clip loaded them: an unreadable file gets its own error)."""
    from vgdistill.models.files import verify_recorded

    if source.arch.startswith(LOCAL_DIR):
        weights = Path(source.arch[len(LOCAL_DIR) :]) / WEIGHTS_FILE
    elif source.weights and Path(source.weights).is_file():
        weights = Path(source.weights)  # a weights file inside a teacher folder, named directly
    else:
        return
    fix = "copy the teacher folder again, or fit it again with `vgdistill teacher --force`"
    verify_recorded(weights, weights.parent / CONFIG_FILE, fix)


def clip_preprocess(model: nn.Module) -> dict[str, Any]:
    """open_clip's preprocess config of `model` (input size, mean, std, interpolation, ...)."""
    return dict(open_clip_module().get_model_preprocess_cfg(model))


def write_local_dir(model: nn.Module, model_cfg: dict[str, Any], folder: Path) -> None:
    """Write open_clip's local-dir layout (config + safetensors) into `folder`; callers write
    into a `build_dir`, which makes the whole folder appear at once. The config also records
    the weights' SHA-256 (open_clip ignores the key), checked on every load."""
    from safetensors.torch import save_file

    from vgdistill.models.files import CHECKSUMS, sha256_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": clip_preprocess(model),
        CHECKSUMS: {WEIGHTS_FILE: sha256_file(folder / WEIGHTS_FILE)},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
