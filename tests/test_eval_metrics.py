"""Evaluation arithmetic: box mapping to original pixels, de-duplication, shuffle control."""

import pytest
import torch

from vgdistill.evaluation.evaluate import _first_occurrence, shuffle_phrases, to_original_xyxy
from vgdistill.report.tables import results_table


def test_prediction_maps_back_to_original_pixels():
    # A 200x100 image resized by 0.32 to 64x32 and padded to 64x64 with 16 px on top.
    scale = torch.tensor([0.32])
    pad = torch.tensor([[0.0, 16.0]])
    orig_size = torch.tensor([[200, 100]])
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0]])  # original xyxy
    padded = box * 0.32 + torch.tensor([0.0, 16.0, 0.0, 16.0])
    cxcywh = torch.cat([(padded[:, :2] + padded[:, 2:]) / 2, padded[:, 2:] - padded[:, :2]], 1)
    back = to_original_xyxy(cxcywh / 64, 64, scale, pad, orig_size)
    assert torch.allclose(back, box, atol=1e-4)
    # Parts outside the image (in the padding) are clipped to it.
    far = to_original_xyxy(torch.tensor([[0.5, 0.05, 1.0, 0.1]]), 64, scale, pad, orig_size)
    assert far[0, 1] == 0 and far[0, 2] == 200


def test_first_occurrence_deduplicates_padded_rows():
    index = torch.tensor([4, 0, 2, 4, 1, 0, 3])
    unique, first = _first_occurrence(index)
    assert unique.tolist() == [0, 1, 2, 3, 4]
    assert first.tolist() == [1, 4, 2, 6, 0]


def test_shuffle_control_is_a_seeded_derangement():
    datasets = pytest.importorskip("datasets")
    phrases = [f"phrase {i}" for i in range(12)]
    ds = datasets.Dataset.from_dict({"expression": phrases, "id": list(range(12))})
    a = shuffle_phrases(ds, seed=13)
    assert sorted(a["expression"]) == sorted(phrases)
    assert all(x != y for x, y in zip(a["expression"], phrases, strict=True))
    assert a["id"] == list(range(12))
    assert shuffle_phrases(ds, seed=13)["expression"] == a["expression"]
    assert shuffle_phrases(ds, seed=14)["expression"] != a["expression"]


def test_results_table_shows_control_columns():
    from rich.console import Console

    m = {"acc50": 0.5, "acc75": 0.25, "miou": 0.4, "count": 8, "images_per_s": 10.0}
    table = results_table({"val": {**m, "shuffle": {**m, "acc50": 0.125}}})
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "Acc@0.5 shuffled" in text and "12.50" in text and "50.00" in text
