"""Fit a CLIP teacher contrastively on the (image, phrase) pairs of a prepared dataset.

No pretrained CLIP can be installed offline, and distilling from a random teacher teaches
nothing, so `vgdistill teacher` learns one: open_clip's own model classes and `ClipLoss`, from
scratch or starting from local open_clip weights (for real users: domain adaptation of CLIP
before distillation). The result is a folder in open_clip's local-dir layout that both
`open_clip.create_model("local-dir:FOLDER")` and a recipe's `distill.teacher = "FOLDER"` load.

The training target. EpmVG feeds the teacher the whole image and the phrase. A grounding
dataset has several phrases per image ("the red circle", "the blue square left of it"), and a
whole-image embedding cannot tell which of them a row is about, so CLIP's in-batch softmax
would punish the model for a true match whenever two phrases of one image share a batch.
Batches are therefore built with at most one phrase per image (and no phrase text twice, so
two images described by the same words are never each other's negative). An epoch still
visits every (image, phrase) row once. Retrieval is scored the same way: an image's top
phrase is a hit when it is any phrase of that image; a phrase's top image is a hit when that
image carries the phrase; chance is computed from those positive sets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgdistill import __version__
from vgdistill.atomic import build_dir, exclusive, write_text
from vgdistill.errors import NonFiniteLossError, VGError
from vgdistill.training import fitted

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch
    from rich.console import Console

    from vgdistill.recipe import Recipe

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
REPORT_FILE = "teacher.json"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 1

# Above this many bytes of decoded frames (float16), decode per batch in worker processes
# instead of holding every distinct image in memory.
CACHE_LIMIT_BYTES = 1 << 30
WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".npz"}


@dataclass
class FitSettings:
    """How the teacher is fitted; recorded in teacher.json (a re-run with equal settings reuses)."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 13

    def validate(self) -> None:
        """Range checks with one-line messages naming the flag."""
        if self.epochs <= 0:
            raise VGError(f"--epochs must be > 0, got {self.epochs}")
        if self.batch_size < 2:
            raise VGError(f"--batch-size must be >= 2 (contrastive batches), got {self.batch_size}")
        if not self.lr > 0:
            raise VGError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise VGError("weight decay, warm-up steps and gradient clipping must be >= 0")


@dataclass
class TeacherSource:
    """Where the teacher's architecture and starting weights come from."""

    arch: str  # open_clip model name, or "local-dir:FOLDER"
    weights: str  # "" (random), a local file, or an open_clip pretrained tag
    model_cfg: dict[str, Any]

    def describe(self) -> str:
        """Human-readable origin, e.g. 'vgd-tiny-clip (random init)'."""
        if self.arch.startswith("local-dir:"):
            return f"{self.arch[len('local-dir:') :]} (local open_clip folder)"
        return f"{self.arch} ({self.weights or 'random init'})"


# --------------------------------------------------------------------------- model configs


def register_configs() -> None:
    """Make vgdistill's bundled open_clip configs (e.g. vgd-tiny-clip) known to open_clip."""
    import open_clip

    from vgdistill.models.teacher import CONFIG_DIR

    known = set(open_clip.list_models())
    if CONFIG_DIR.is_dir() and not all(p.stem in known for p in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)


def is_model_name(name: str) -> bool:
    """True when `name` is a registered open_clip model name (after vgdistill's own configs)."""
    import open_clip

    register_configs()
    return name.replace("/", "-") in open_clip.list_models()


def _unknown_model(name: str, key: str) -> VGError:
    import open_clip

    close = difflib.get_close_matches(name, open_clip.list_models(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return VGError(
        f"{key} = {name!r} is not an open_clip model name{hint} nor a folder written by "
        f"`vgdistill teacher`; e.g. vgd-tiny-clip, ViT-B-16 (see open_clip.list_models())"
    )


def _read_folder_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise VGError(f"{folder} has no {CONFIG_FILE}: not an open_clip local-dir folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        return dict(cfg["model_cfg"])
    except (ValueError, KeyError, TypeError) as e:
        raise VGError(f"{path}: not a valid open_clip config ({e})") from None


def resolve_source(recipe: Recipe, init: str | None = None) -> TeacherSource:
    """Pick the architecture and starting weights from the recipe and the `--init` flag.

    Architecture: distill.teacher_arch if set, else distill.teacher when that is an open_clip
    model name (when distill.teacher is a folder, it is where the fitted teacher goes).
    Weights: --init, else distill.teacher_pretrained: '' = random, a local-dir folder
    (config and weights from it), a local weights file, or an open_clip tag (downloads).
    """
    import open_clip

    register_configs()
    d = recipe.distill
    weights = d.teacher_pretrained if init is None else init
    if weights and Path(weights).is_dir():
        folder = Path(weights).resolve()
        cfg = _read_folder_config(folder)
        # open_clip would quietly start from random weights when the folder has none
        if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
            raise VGError(f"{folder} holds no open_clip weights ({WEIGHTS_FILE})")
        return TeacherSource(f"local-dir:{folder}", str(folder), cfg)
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
    return TeacherSource(arch, weights, open_clip.get_model_config(arch))


def create_model(source: TeacherSource) -> torch.nn.Module:
    """Build the open_clip model (dict output) from a resolved source; errors become VGError."""
    import open_clip

    # open_clip warns (on the root logger) that a model without weights starts random: that
    # is the point of fitting from scratch, so keep it off the user's screen then
    quiet = not source.weights
    if quiet:
        logging.disable(logging.WARNING)
    try:
        # pretrained_text=False: a config with a Hugging Face text tower must not download
        # its default weights; a full CLIP checkpoint, when given, sets every weight anyway
        if source.arch.startswith("local-dir:"):
            model = open_clip.create_model(source.arch, output_dict=True, pretrained_text=False)
        else:
            model = open_clip.create_model(
                source.arch,
                pretrained=source.weights or None,
                output_dict=True,
                pretrained_text=False,
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
            "local weights (--init PATH) or '' to fit from scratch"
        ) from None
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    return model


def get_tokenizer(source: TeacherSource) -> Any:
    """open_clip's tokenizer for the teacher (its context length from the model config)."""
    import open_clip

    return open_clip.get_tokenizer(source.arch)


def default_out(recipe: Recipe, recipe_path: str | Path) -> Path:
    """Where the teacher goes without --out: distill.teacher when it names a folder (so the
    recipe's training finds it), else runs/teacher-<recipe name>."""
    if not is_model_name(recipe.distill.teacher):
        return Path(recipe.distill.teacher)
    return Path("runs") / f"teacher-{Path(recipe_path).stem}"


# --------------------------------------------------------------------------- data


def normalise_phrase(text: str) -> str:
    """The key under which two phrases count as the same text (case and spacing ignored)."""
    return " ".join(text.lower().split())


@dataclass
class PairTable:
    """The rows of one split as (image index, phrase) pairs over its distinct images."""

    image_of_row: list[int]  # row -> index into `first_row`
    phrases: list[str]  # row -> phrase as written
    first_row: list[int]  # image index -> a row that holds the image

    @classmethod
    def from_split(cls, ds: Any) -> PairTable:
        """Group a split's rows by image_id."""
        image_ids = list(ds["image_id"])
        phrases = [str(p) for p in ds["expression"]]
        index: dict[str, int] = {}
        first_row: list[int] = []
        image_of_row = []
        for row, iid in enumerate(image_ids):
            if iid not in index:
                index[iid] = len(first_row)
                first_row.append(row)
            image_of_row.append(index[iid])
        return cls(image_of_row, phrases, first_row)

    def positives(self) -> tuple[list[str], list[set[int]]]:
        """Distinct phrase texts, and for each image the set of text indices it carries."""
        texts: dict[str, int] = {}
        pos: list[set[int]] = [set() for _ in self.first_row]
        for img, phrase in zip(self.image_of_row, self.phrases, strict=True):
            key = normalise_phrase(phrase)
            pos[img].add(texts.setdefault(key, len(texts)))
        return list(texts), pos


def distinct_batches(
    image_of_row: Sequence[int],
    phrases: Sequence[str],
    batch_size: int,
    rng: random.Random,
    window: int = 32,
) -> list[list[int]]:
    """Shuffle rows into batches with no image and no phrase text twice in one batch.

    First fit over a small window of open batches: each row joins the first open batch it
    does not clash with; a batch leaves when full (or when too many are open). Every row is
    used once; only a leftover batch of one row (no negative to contrast with) is dropped.
    """
    order = list(range(len(image_of_row)))
    rng.shuffle(order)
    done: list[list[int]] = []
    open_: list[tuple[list[int], set[int], set[str]]] = []
    for row in order:
        img, text = image_of_row[row], normalise_phrase(phrases[row])
        for k, (rows, imgs, texts) in enumerate(open_):
            if img not in imgs and text not in texts:
                rows.append(row)
                imgs.add(img)
                texts.add(text)
                if len(rows) == batch_size:
                    done.append(open_.pop(k)[0])
                break
        else:
            open_.append(([row], {img}, {text}))
            if len(open_) > window:
                done.append(open_.pop(0)[0])
    done.extend(rows for rows, _, _ in open_)
    return [b for b in done if len(b) >= 2]


class Frames:
    """A split's rows as the student sees them: (ImageNet-normalised padded image [3,S,S], phrase).

    The same decoder and transform as training (vgdistill.data), so the teacher is fitted on
    exactly the frames it will be shown at distillation time; with `augment`, TransVG's
    augmentation (a flip swaps left/right in the phrase too). When an image can only take fixed
    forms (no augmentation, or flips only), its forms can be decoded once and kept (float16) in
    memory, so epochs after the first touch no PNG.
    """

    def __init__(
        self,
        ds: Any,
        table: PairTable,
        image_size: int,
        augment: bool,
        augment_ops: Sequence[str],
    ):
        import datasets

        from vgdistill.data.transforms import GroundingTransform

        cols = [c for c in ("image", "image_id", "source") if c in ds.column_names]
        self.ds = ds.select_columns(cols).cast_column("image", datasets.Image(decode=False))
        self.table = table
        self.size = int(image_size)
        self.transform = GroundingTransform(self.size, augment=augment, ops=augment_ops)
        self.flips = self.transform.fixed_flips()
        self.cache: torch.Tensor | None = None  # [images, flips, 3, S, S] float16

    def __len__(self) -> int:
        return len(self.table.phrases)

    def _frame(self, row: int, phrase: str) -> tuple[torch.Tensor, str]:
        from vgdistill.data.images import load_row_image

        rec = self.ds[int(row)]
        name = f"{rec.get('source', 'dataset')} row {row} (image {rec.get('image_id')})"
        seed = int(_torch_seed()) if self.transform.augment else 0
        out = self.transform(load_row_image(rec, name), None, phrase, random.Random(seed))
        return out.image, out.phrase

    def __getitem__(self, row: int) -> tuple[torch.Tensor, str]:
        """Row `row` as (image float32 [3,S,S], phrase after any flip word-swap)."""
        phrase = self.table.phrases[row]
        if self.cache is not None:
            from vgdistill.data.transforms import FLIP_PROB, swap_left_right

            flipped = len(self.cache[0]) > 1 and random.Random(_torch_seed()).random() < FLIP_PROB
            if flipped:
                phrase = swap_left_right(phrase)
            return self.cache[self.table.image_of_row[row], int(flipped)].float(), phrase
        return self._frame(row, phrase)

    def image(self, k: int) -> torch.Tensor:
        """Distinct image `k` (un-augmented), float32 [3,S,S]."""
        if self.cache is not None:
            return self.cache[k, 0].float()
        return self._frame(self.table.first_row[k], "")[0]

    def forms(self, k: int) -> torch.Tensor:
        """Distinct image `k` under each of `self.flips`, float32 [flips,3,S,S]."""
        import torch

        from vgdistill.data.images import load_row_image

        rec = self.ds[int(self.table.first_row[k])]
        img = load_row_image(rec, f"{rec.get('source', 'dataset')} image {rec.get('image_id')}")
        box = [0.0, 0.0, img.width, img.height]
        return torch.stack([self.transform.fixed(img, box, "", f).image for f in self.flips or ()])

    def cacheable(self) -> bool:
        """Whether every distinct image's forms fit in memory (CACHE_LIMIT_BYTES)."""
        if self.flips is None:
            return False
        n_bytes = len(self.table.first_row) * len(self.flips) * 3 * self.size * self.size * 2
        return n_bytes <= CACHE_LIMIT_BYTES

    def load_cache(self, num_workers: int) -> None:
        """Decode every distinct image once (in worker processes) and keep its forms in memory."""
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _DistinctImages(self, forms=True),
            batch_size=64,
            num_workers=num_workers,
            collate_fn=torch.stack,
        )
        chunks = [b.half() for b in loader]
        empty = torch.empty(0, len(self.flips or ()), 3, self.size, self.size)
        self.cache = torch.cat(chunks) if chunks else empty


def _torch_seed() -> int:
    """A seed drawn from torch's generator (DataLoader seeds it per worker from its own)."""
    import torch

    return int(torch.randint(0, 2**62, ()).item())


class _DistinctImages:
    """Map-style dataset over a split's distinct images (for caching and scoring): item k is
    `frames.image(k)`, or with `forms` every cached flip of it, `frames.forms(k)`."""

    def __init__(self, frames: Frames, forms: bool = False):
        self.frames, self.forms = frames, forms

    def __len__(self) -> int:
        return len(self.frames.table.first_row)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.frames.forms(k) if self.forms else self.frames.image(k)


def _collate_pairs(samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    import torch

    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


# --------------------------------------------------------------------------- metrics


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, positives: Sequence[set[int]]
) -> dict[str, float]:
    """R@1 / R@5 both ways, with chance R@1, for L2-normalised embeddings.

    image_emb [I,E], text_emb [T,E] (T distinct phrase texts), positives[i] = texts of image i.
    image->phrase: hit when image i's best text is one of positives[i]. phrase->image: hit when
    text t's best image carries t. Chance = expected R@1 of a uniformly random ranking.
    """
    import torch

    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    pos = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, texts in enumerate(positives):
        pos[i, list(texts)] = True
    sim = image_emb.float() @ text_emb.float().T
    out: dict[str, float] = {}
    for name, s, p in (("i2t", sim, pos), ("t2i", sim.T, pos.T)):
        for k in (1, 5):
            top = s.topk(min(k, s.shape[1]), dim=1).indices
            out[f"{name}_r{k}"] = p.gather(1, top).any(dim=1).float().mean().item()
        out[f"{name}_chance"] = (p.sum(1).float() / p.shape[1]).mean().item()
    out["images"], out["texts"] = float(n_img), float(n_txt)
    return out


# --------------------------------------------------------------------------- fitting


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings' scale and the logit scale (CLIP practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "logit_scale" in name or name.endswith(".bias")
        (no_decay if flat else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@contextlib.contextmanager
def _autocast(device: torch.device) -> Iterator[None]:
    import torch

    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@dataclass
class SplitPairs:
    """One split ready for fitting or scoring: rows, frames, distinct texts and positives."""

    table: PairTable
    frames: Frames
    texts: list[str]
    positives: list[set[int]]


def load_split_pairs(recipe: Recipe, split: str, augment: bool = False) -> SplitPairs:
    """Read `split` of recipe.data.path as the student's frames (data.image_size).

    Every distinct image is decoded once and kept when its forms fit in CACHE_LIMIT_BYTES and
    are fixed (no augmentation, or flips only).
    """
    from vgdistill.data.prepare import load_split

    ds = load_split(recipe.data.path, split)
    table = PairTable.from_split(ds)
    frames = Frames(ds, table, recipe.data.image_size, augment, recipe.data.augment_ops)
    if frames.cacheable():
        frames.load_cache(recipe.data.num_workers)
    texts, positives = table.positives()
    return SplitPairs(table, frames, texts, positives)


def wrap_teacher(model: torch.nn.Module, tokenizer: Any, model_cfg: dict[str, Any]) -> Any:
    """The open_clip model inside vgdistill's Teacher (trainable, fp32), whose `image_input`
    turns a student frame into the teacher's input exactly as at distillation time."""
    from vgdistill.models.teacher import Teacher

    return Teacher(model, tokenizer, model_cfg, trainable=True, precision="fp32")


def evaluate_retrieval(
    teacher: Any,
    split: SplitPairs,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, float]:
    """Embed a split's distinct images and phrase texts and score retrieval both ways."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    clip = teacher.clip
    was_training = clip.training
    clip.eval()
    images = DataLoader(
        _DistinctImages(split.frames),
        batch_size=batch_size,
        num_workers=0 if split.frames.cache is not None else num_workers,
        collate_fn=torch.stack,
    )
    img_chunks, txt_chunks = [], []
    with torch.no_grad(), _autocast(device):
        for batch in images:
            x = teacher.image_input(batch.to(device))
            img_chunks.append(F.normalize(clip.encode_image(x).float(), dim=-1).cpu())
        for s in range(0, len(split.texts), batch_size):
            tokens = teacher.tokenizer(split.texts[s : s + batch_size]).to(device)
            txt_chunks.append(F.normalize(clip.encode_text(tokens).float(), dim=-1).cpu())
    clip.train(was_training)
    return retrieval_metrics(torch.cat(img_chunks), torch.cat(txt_chunks), split.positives)


def _settings_key(recipe: Recipe, source: TeacherSource, settings: FitSettings) -> dict[str, Any]:
    """What must match for an existing teacher folder to be reused."""
    return {
        "source": source.arch,
        "weights": source.weights,
        "data_path": str(Path(recipe.data.path).resolve()),
        "train_split": recipe.data.train_split,
        "val_split": recipe.data.val_split,
        "image_size": recipe.data.image_size,
        "augment": recipe.data.augment,
        "augment_ops": recipe.data.augment_ops,
        "fit": dataclasses.asdict(settings),
    }


def save_teacher(model: torch.nn.Module, model_cfg: dict[str, Any], folder: Path) -> None:
    """Write open_clip's local-dir layout (config + safetensors) into `folder`; callers write
    into a `build_dir`, which makes the whole folder appear at once."""
    import open_clip
    from safetensors.torch import save_file

    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": dict(open_clip.get_model_preprocess_cfg(model)),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def open_clip_preprocess(model: torch.nn.Module) -> dict[str, Any]:
    """The teacher's input size (h, w), mean and std, from open_clip's preprocess config."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {"size": list(size), "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_teacher(
    recipe: Recipe,
    out: str | Path,
    settings: FitSettings | None = None,
    init: str | None = None,
    force: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit (or reuse) a CLIP teacher on `recipe`'s data and write it to `out`.

    Returns the teacher.json report plus "reused": {"metrics": {"before", "after"} (validation
    retrieval), "history" (per epoch), "settings", "data", "fit_s", "time_s", ...}. A complete
    `out` fitted with the same settings is reused unless `force`.
    """
    import torch
    from rich.console import Console

    console = console or Console(stderr=True)
    settings = settings or FitSettings(seed=recipe.train.seed)
    settings.validate()
    out = Path(out)
    source = resolve_source(recipe, init)
    if source.arch.startswith("local-dir:") and Path(source.weights) == out.resolve():
        raise VGError(f"--init and --out are the same folder ({out}); write the teacher elsewhere")
    key = _settings_key(recipe, source, settings)

    with exclusive(out, "another `vgdistill teacher`"):
        reused = fitted.reusable_report(
            out, REPORT_FILE, WEIGHTS_FILE, key, "teacher", force, marker=CONFIG_FILE
        )
        if reused is not None:
            return reused

        t0 = time.perf_counter()
        from vgdistill.data.prepare import load_split

        # both splits are read before any model is built: a bad dataset fails fast
        for split in (recipe.data.train_split, recipe.data.val_split):
            load_split(recipe.data.path, split)
        torch.manual_seed(settings.seed)
        device = _device()
        model = create_model(source)
        teacher = wrap_teacher(model, get_tokenizer(source), source.model_cfg).to(device)
        splits = {
            "train": load_split_pairs(recipe, recipe.data.train_split, recipe.data.augment),
            "val": load_split_pairs(recipe, recipe.data.val_split),
        }
        with build_dir(out) as tmp:
            report = _train(
                teacher, splits, device, settings, recipe.data.num_workers, tmp, console, progress
            )
            report.update(
                format_version=FORMAT_VERSION,
                vgdistill_version=__version__,
                complete=True,
                teacher=source.describe(),
                settings=key,
                data={
                    "path": recipe.data.path,
                    "train_split": recipe.data.train_split,
                    "val_split": recipe.data.val_split,
                    "train_rows": len(splits["train"].table.phrases),
                    "train_images": len(splits["train"].table.first_row),
                    "val_rows": len(splits["val"].table.phrases),
                    "val_images": len(splits["val"].table.first_row),
                },
                device=str(device),
                time_s=round(time.perf_counter() - t0, 2),
            )
            save_teacher(model, source.model_cfg, tmp)
            write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return {**report, "reused": False}


def _train(
    teacher: Any,
    splits: dict[str, SplitPairs],
    device: torch.device,
    settings: FitSettings,
    num_workers: int,
    folder: Path,
    console: Console,
    show_progress: bool,
) -> dict[str, Any]:
    """The contrastive loop; appends one metrics.jsonl line per epoch into `folder`."""
    import open_clip
    import torch
    from torch.utils.data import DataLoader

    from vgdistill.training.optim import warmup_cosine

    model = teacher.clip
    train, val = splits["train"], splits["val"]
    rng = random.Random(settings.seed)
    rows, phrases = train.table.image_of_row, train.table.phrases
    # one epoch's batches sizes the schedule (later epochs differ by at most a batch or two)
    steps_per_epoch = len(distinct_batches(rows, phrases, settings.batch_size, random.Random(0)))
    if steps_per_epoch == 0:
        raise VGError("the training split has fewer than two usable (image, phrase) pairs")
    total = steps_per_epoch * settings.epochs

    loss_fn = open_clip.ClipLoss()
    # fused AdamW runs on CPU and GPU alike; the per-tensor default spends most of a tiny
    # model's step in Python and element-wise kernels
    opt = torch.optim.AdamW(
        _param_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, settings.warmup_steps, total)
    )
    max_scale = math.log(100.0)  # CLIP caps the learned inverse temperature at 100

    before = evaluate_retrieval(teacher, val, device, num_workers=num_workers)
    after = before
    history: list[dict[str, Any]] = []
    step = 0
    teacher.train()
    t0 = time.perf_counter()
    with (
        fitted.fit_progress(
            "[bold]teacher[/] epoch {task.fields[epoch]}/" + str(settings.epochs),
            console,
            show_progress,
        ) as bar,
        open(folder / METRICS_FILE, "w", encoding="utf-8") as log,
    ):
        task = bar.add_task("fit", total=total, epoch=1, loss="-")
        for epoch in range(1, settings.epochs + 1):
            batches = distinct_batches(rows, phrases, settings.batch_size, rng)
            loader = DataLoader(
                train.frames,
                batch_sampler=batches,
                num_workers=0 if train.frames.cache is not None else num_workers,
                collate_fn=_collate_pairs,
                pin_memory=device.type == "cuda",
            )
            losses = []
            for images, texts in loader:
                x = teacher.image_input(images.to(device, non_blocking=True))
                tokens = teacher.tokenizer(texts).to(device, non_blocking=True)
                with _autocast(device):
                    outs = model(x, tokens)
                    loss = loss_fn(
                        outs["image_features"], outs["text_features"], outs["logit_scale"]
                    )
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"teacher loss is {loss.item()} at step {step}; lower --lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, max_scale)
                losses.append(loss.item())
                step += 1
                bar.update(task, advance=1, epoch=epoch, loss=f"{losses[-1]:.3f}")
            after = evaluate_retrieval(teacher, val, device, num_workers=num_workers)
            line = {
                "type": "teacher",
                "epoch": epoch,
                "step": step,
                "train_loss": sum(losses) / max(1, len(losses)),
                "lr": opt.param_groups[0]["lr"],
                "logit_scale": float(model.logit_scale.exp().item()),
                "pairs": sum(len(b) for b in batches),
                **{f"val_{k}": v for k, v in after.items()},
                "time_s": round(time.perf_counter() - t0, 2),
            }
            history.append(line)
            log.write(json.dumps(line) + "\n")
            log.flush()
            if show_progress:
                bar.console.print(
                    f"epoch {epoch}: loss {line['train_loss']:.3f}  val R@1 "
                    f"image->phrase {after['i2t_r1']:.3f}  phrase->image {after['t2i_r1']:.3f}",
                    highlight=False,
                )
    teacher.eval()
    return {
        "metrics": {"before": before, "after": after},
        "history": history,
        "fit_s": round(time.perf_counter() - t0, 2),
        "steps": step,
        "preprocess": open_clip_preprocess(model),
    }
