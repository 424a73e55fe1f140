"""Image <-> phrase retrieval of a CLIP teacher on a split's distinct images and phrase texts.

An image's top phrase is a hit when it is any phrase of that image; a phrase's top image is a
hit when that image carries the phrase; chance is computed from those positive sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of `vgdistill --help`
    import torch

    from vgdistill.data.pairs import SplitPairs
    from vgdistill.models.teacher import Teacher


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


def evaluate_retrieval(
    teacher: Teacher,
    split: SplitPairs,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, float]:
    """Embed a split's distinct images and phrase texts and score retrieval both ways."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from vgdistill.data.pairs import DistinctImages
    from vgdistill.device import gpu_bf16_autocast

    clip = teacher.clip
    was_training = clip.training
    clip.eval()
    images = DataLoader(
        DistinctImages(split.frames),
        batch_size=batch_size,
        num_workers=0 if split.frames.cache is not None else num_workers,
        collate_fn=torch.stack,
    )
    img_chunks, txt_chunks = [], []
    with torch.no_grad(), gpu_bf16_autocast(device):
        for batch in images:
            x = teacher.image_input(batch.to(device))
            img_chunks.append(F.normalize(clip.encode_image(x).float(), dim=-1).cpu())
        for s in range(0, len(split.texts), batch_size):
            tokens = teacher.tokenizer(split.texts[s : s + batch_size]).to(device)
            txt_chunks.append(F.normalize(clip.encode_text(tokens).float(), dim=-1).cpu())
    clip.train(was_training)
    return retrieval_metrics(torch.cat(img_chunks), torch.cat(txt_chunks), split.positives)
