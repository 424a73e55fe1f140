"""The public Python API: `Grounder.from_pretrained(run).predict(image, phrases)` -> boxes.

The model is loaded once. An image is decoded upright (its EXIF orientation applied, as a
viewer shows it; modes and limits as in `prepare`), preprocessed by the evaluation transform,
and goes through the visual branch once whatever the number of phrases; each phrase then
runs through BERT, the fusion and the box head. Boxes come back as pixel xyxy in that
upright image, clamped inside it: what `eval` scores for the same image and phrase.
"""

from __future__ import annotations

import io
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vgdistill.data.images import load_image
from vgdistill.device import resolve_device, set_cuda_speed_flags
from vgdistill.errors import VGError

Box = tuple[float, float, float, float]
ImageInput = str | os.PathLike | bytes | Image.Image
FRAME = "upright"
"""The frame returned boxes are in: the image with its EXIF orientation applied."""


class InvalidText(VGError):
    """Text that is not valid Unicode (a lone surrogate), e.g. from a badly decoded file."""


@dataclass
class Grounding:
    """One phrase grounded on one image."""

    phrase: str
    box: Box
    """Pixel xyxy in the upright image (continuous coordinates, 0..width / 0..height)."""
    heat: np.ndarray | None = field(default=None, repr=False)
    """[height, width] float32 in 0..1: where [REG] attends in the last fusion layer."""


def check_unicode(text: str, label: str) -> None:
    """InvalidText naming `label` when `text` holds a lone surrogate (not Unicode text)."""
    bad = next((c for c in text if unicodedata.category(c) == "Cs"), None)
    if bad is not None:
        raise InvalidText(
            f"{label} holds the invalid code point U+{ord(bad):04X} (a lone surrogate, not "
            "Unicode text: was it decoded with the wrong encoding?)"
        )


def clean_phrase(phrase: object, label: str = "phrase") -> str:
    """The phrase as the model gets it: NFKC-normalised, control and format characters
    (NUL, zero-width space, ...) removed, spaces collapsed.

    VGError when it is not text or holds no letter or digit; InvalidText for a lone surrogate.
    """
    if not isinstance(phrase, str):
        raise VGError(f"{label} must be text, got {type(phrase).__name__}")
    check_unicode(phrase, label)
    text = unicodedata.normalize("NFKC", phrase)
    # BERT's tokenizer drops these characters too; removing them here keeps the shown phrase
    # equal to what the model reads.
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
    text = " ".join(text.split())
    if not any(c.isalnum() for c in text):  # a letter or digit in any script
        raise VGError(
            f'{label} is empty (no letters or digits); give the words to ground, e.g. "the red '
            'circle"'
        )
    return text


def check_phrases(phrases: Sequence[object], where: str = "phrase") -> list[str]:
    """Every phrase through `clean_phrase`; VGError naming the first bad one, or none given."""
    if not phrases:
        raise VGError(f'give at least one {where} to ground, e.g. "the red circle"')
    many = len(phrases) > 1
    return [clean_phrase(p, f"{where} {i}" if many else where) for i, p in enumerate(phrases, 1)]


def as_rgb_image(image: ImageInput, name: str | None = None) -> Image.Image:
    """An upright RGB PIL image from a path, encoded bytes or a PIL image."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return image
        # Other modes go through the one decoder, so alpha, 16-bit etc. match `prepare`.
        buf = io.BytesIO()
        try:
            image.save(buf, format="PNG")
        except OSError:  # a mode PNG cannot hold (e.g. 32-bit float): plain conversion
            return image.convert("RGB")
        return load_image(buf.getvalue(), name=name or "<PIL image>", upright=True)
    return load_image(image, name=name, upright=True)


def attention_heat(
    attention: np.ndarray,
    feature_hw: tuple[int, int],
    image_size: int,
    scale: float,
    pad: tuple[float, float],
    orig_size: tuple[int, int],
) -> np.ndarray:
    """[REG]->visual attention over the token grid -> [H, W] heat in 0..1 on the original image.

    The grid covers the padded SxS frame; it is upsampled to that frame, the part the image
    occupies (orig = (padded - pad) / scale) is cut out and resized to the original size.
    """
    h, w = feature_hw
    grid = np.asarray(attention, dtype=np.float32).reshape(h, w)
    frame = Image.fromarray(grid, mode="F").resize((image_size, image_size), Image.BILINEAR)
    width, height = orig_size
    left, top = float(pad[0]), float(pad[1])
    region = (left, top, left + width * scale, top + height * scale)
    heat = frame.resize((width, height), Image.BILINEAR, box=region)
    arr = np.asarray(heat, dtype=np.float32)
    top_value = float(arr.max()) if arr.size else 0.0
    return arr / top_value if top_value > 0 else arr


class Grounder:
    """A checkpoint loaded once, ready to ground phrases on images.

    >>> grounder = Grounder.from_pretrained("runs/demo/student")
    >>> grounder.predict("photo.jpg", ["the red circle"])  # [(x1, y1, x2, y2)] in pixels
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        overrides: Sequence[str] = (),
    ) -> None:
        from vgdistill.data.transforms import GroundingTransform
        from vgdistill.evaluation.inference import load_for_inference
        from vgdistill.models.factory import build_tokenizer

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model, self.recipe, self.checkpoint = load_for_inference(path, self.device, overrides)
        set_cuda_speed_flags(self.device)
        self.tokenizer = build_tokenizer(self.recipe.model)
        self.image_size = self.recipe.data.image_size
        self.max_query_len = self.recipe.data.max_query_len
        self.transform = GroundingTransform(self.image_size, augment=False)
        self.batch_size = max(1, self.recipe.eval.batch_size)

    @classmethod
    def from_pretrained(
        cls,
        path_or_run: str | os.PathLike,
        device: str | torch.device | None = None,
        overrides: Sequence[str] = (),
    ) -> Grounder:
        """Load a run folder (its best/, else last/) or a checkpoint folder; device "auto"
        (the default: a GPU when present), "cpu", "cuda" or "cuda:N"."""
        return cls(Path(path_or_run), device, overrides)

    def predict(self, image: ImageInput, phrases: Sequence[str] | str) -> list[Box]:
        """One pixel xyxy box per phrase, in the upright image's pixels."""
        return [g.box for g in self.ground(image, phrases)]

    @torch.no_grad()
    def ground(
        self, image: ImageInput, phrases: Sequence[str] | str, attention: bool = False
    ) -> list[Grounding]:
        """Ground each phrase on `image`; with attention=True each result carries a heat map."""
        from vgdistill.data.loader import encode_phrase
        from vgdistill.evaluation.protocol import to_original_xyxy

        texts = check_phrases([phrases] if isinstance(phrases, str) else list(phrases))
        img = as_rgb_image(image)
        t = self.transform(img, None, "")
        # The visual branch depends only on the image: run it once for every phrase.
        tokens, pad, _ = self.model.visual(
            t.image.to(self.device).unsqueeze(0), t.mask.to(self.device).unsqueeze(0)
        )
        results: list[Grounding] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            n = len(chunk)
            encoded = [encode_phrase(self.tokenizer, p, self.max_query_len) for p in chunk]
            ids = torch.tensor([e[0] for e in encoded], dtype=torch.int64, device=self.device)
            mask = torch.tensor([e[1] for e in encoded], dtype=torch.int64, device=self.device)
            visual = (tokens.expand(n, -1, -1), pad.expand(n, -1))
            out = self.model(None, None, ids, mask, return_attention=attention, visual=visual)
            self._check_finite(out.pred_boxes, chunk)
            boxes = to_original_xyxy(
                out.pred_boxes.float().cpu(),
                self.image_size,
                torch.full((n,), t.scale, dtype=torch.float32),
                torch.tensor([t.pad], dtype=torch.float32).expand(n, 2),
                torch.tensor([[img.width, img.height]], dtype=torch.int64).expand(n, 2),
            )
            for i, phrase in enumerate(chunk):
                heat = None
                if attention and out.attention is not None and out.feature_hw is not None:
                    heat = attention_heat(
                        out.attention[i].float().cpu().numpy(),
                        out.feature_hw,
                        self.image_size,
                        t.scale,
                        t.pad,
                        img.size,
                    )
                x1, y1, x2, y2 = (float(v) for v in boxes[i].tolist())
                results.append(Grounding(phrase=phrase, box=(x1, y1, x2, y2), heat=heat))
        return results

    def _check_finite(self, pred: torch.Tensor, phrases: Sequence[str]) -> None:
        """VGError naming the checkpoint when a predicted box is NaN or infinite."""
        finite = torch.isfinite(pred).all(dim=-1)
        if not bool(finite.all()):
            phrase = phrases[int((~finite).nonzero()[0, 0])]
            raise VGError(
                f"the checkpoint {self.checkpoint} predicts a non-finite box (NaN) for "
                f"{phrase!r}: its weights are damaged or its training diverged"
            )
