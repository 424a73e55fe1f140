"""Every source format, built as a tiny fixture in a temp dir and checked row by row.

refer layout (instances.json + refs pickle), TransVG .pth split files (refcoco, referit,
flickr), and the refusal of a malicious refs pickle; the Hugging Face dumps are in
test_data_sources_hf.py.
"""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vgdistill.data.manifest import load_prepared
from vgdistill.data.prepare import prepare
from vgdistill.data.sources import SourceArgs, get_source
from vgdistill.data.sources.refer import safe_load_pickle
from vgdistill.errors import VGError

SIZES = {1: (64, 48), 2: (50, 60), 3: (40, 40)}  # COCO image id -> (width, height)


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def write_images(folder, sizes=SIZES, name=coco_name):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, (w, h) in sizes.items():
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name(image_id), quality=90)
    return folder


# --------------------------------------------------------------------------------- refer layout

ANNS = {  # ann id -> (image id, COCO xywh box)
    10: (1, [4.0, 6.0, 20.0, 10.0]),
    11: (2, [0.5, 1.5, 30.0, 20.0]),
    12: (3, [10.0, 12.0, 8.0, 9.0]),
    13: (1, [30.0, 20.0, 12.5, 14.0]),
}


def make_refer(root, dataset="refcoco"):
    """<root>/<dataset>/instances.json + refs(unc).p + refs(google).p + COCO images."""
    folder = root / dataset
    folder.mkdir(parents=True)
    instances = {
        "images": [
            {"id": i, "file_name": coco_name(i), "width": w, "height": h}
            for i, (w, h) in SIZES.items()
        ],
        "annotations": [
            {"id": a, "image_id": i, "bbox": box, "category_id": 1} for a, (i, box) in ANNS.items()
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))

    def ref(ref_id, ann_id, split, sents):
        return {
            "ref_id": ref_id,
            "ann_id": ann_id,
            "image_id": ANNS[ann_id][0],
            "split": split,
            # refs' file_name carries an ann suffix; the real file comes from instances.json.
            "file_name": coco_name(ANNS[ann_id][0])[:-4] + f"_{ann_id}.jpg",
            "category_id": 1,
            "sent_ids": list(range(len(sents))),
            "sentences": [
                {"raw": s.upper(), "sent": s, "sent_id": k, "tokens": s.split()}
                for k, s in enumerate(sents)
            ],
        }

    unc = [
        ref(100, 10, "train", ["left dog", "small brown dog"]),
        ref(101, 11, "val", ["man in red"]),
        ref(102, 12, "testA", ["the person", "woman", "lady"]),
        ref(103, 13, "testB", ["cup on the right"]),
    ]
    google = [ref(200, 10, "train", ["dog"]), ref(201, 11, "val", ["man"])]
    # Protocol 2, as the released (Python 2) refs files are.
    (folder / "refs(unc).p").write_bytes(pickle.dumps(unc, protocol=2))
    (folder / "refs(google).p").write_bytes(pickle.dumps(google, protocol=2))
    write_images(root / "images" / "mscoco" / "images" / "train2014")
    return root


def xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def test_refer_rows_one_per_sentence_with_xyxy_boxes(tmp_path):
    root = make_refer(tmp_path / "refer")
    rows = list(get_source("refcoco").rows(SourceArgs(root=root)))
    expected = (
        [(s, "train", 10, 100) for s in ["left dog", "small brown dog"]]
        + [("man in red", "val", 11, 101)]
        + [(s, "testA", 12, 102) for s in ["the person", "woman", "lady"]]
        + [("cup on the right", "testB", 13, 103)]
    )
    assert len(rows) == len(expected)
    for row, (sent, split, ann, ref_id) in zip(rows, expected, strict=True):
        image_id = ANNS[ann][0]
        assert row.expression == sent and row.split == split
        assert row.bbox_xyxy == tuple(xyxy(ANNS[ann][1]))
        assert row.image_id == str(image_id) and row.ref_id == str(ref_id)
        assert row.image.endswith(coco_name(image_id)) and os.path.isfile(row.image)

    google = list(get_source("refcoco").rows(SourceArgs(root=root, split_by="google")))
    assert [(r.expression, r.split) for r in google] == [("dog", "train"), ("man", "val")]
    with pytest.raises(VGError, match="umd"):
        get_source("refcoco").inputs(SourceArgs(root=root, split_by="umd"))


def test_refer_prepare_end_to_end(tmp_path):
    root = make_refer(tmp_path / "refer")
    result = prepare("refcoco", SourceArgs(root=root), tmp_path / "out", progress=False)
    dd = load_prepared(tmp_path / "out")
    assert sorted(dd) == ["testA", "testB", "train", "val"]
    assert {s: len(d) for s, d in dd.items()} == {"train": 2, "val": 1, "testA": 3, "testB": 1}
    counts = result.manifest["counts"]
    assert counts["testA"] == {
        "read": 3,
        "kept": 3,
        "clipped": 0,
        "dropped": {r: 0 for r in counts["testA"]["dropped"]},
    }
    row = dd["testB"][0]
    assert row["expression"] == "cup on the right" and row["source"] == "refcoco"
    assert row["bbox"] == pytest.approx(xyxy(ANNS[13][1]))
    assert (row["width"], row["height"]) == SIZES[1] == row["image"].size
    # Image bytes are the original JPEG file, embedded.
    assert dd["testB"].features["image"].decode
    # refcoco with unc kept val's box [0.5, 1.5, 30.5, 21.5] as is.
    assert dd["val"][0]["bbox"] == pytest.approx([0.5, 1.5, 30.5, 21.5])
    with pytest.raises(VGError, match="--splits names testC"):
        prepare("refcoco", SourceArgs(root=root, splits=["val", "testC"]), tmp_path / "o2")


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Gadget:  # a custom class: building it is refused too
    pass


def test_malicious_refs_pickle_is_refused_and_nothing_runs(tmp_path):
    root = make_refer(tmp_path / "refer")
    marker = tmp_path / "pwned"
    refs = root / "refcoco" / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 1, "evil": _RunsCommand(marker)}], protocol=2))
    with pytest.raises(VGError, match=r"refused to load.*(posix|os)\.system"):
        prepare("refcoco", SourceArgs(root=root), tmp_path / "out", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # The same pickle with an unrestricted loader really would run the command.
    pickle.loads(refs.read_bytes())
    assert marker.exists()

    other = tmp_path / "gadget.p"
    other.write_bytes(pickle.dumps([Gadget()]))
    with pytest.raises(VGError, match="Gadget"):
        safe_load_pickle(other)
    # Plain containers and sets still load.
    ok = tmp_path / "ok.p"
    ok.write_bytes(pickle.dumps([{"a": {1, 2}, "b": (1.5, "x", None, b"raw")}], protocol=2))
    assert safe_load_pickle(ok) == [{"a": {1, 2}, "b": (1.5, "x", None, b"raw")}]


# --------------------------------------------------------------------------- TransVG splits


def make_transvg(root):
    """<root>/unc/unc_{train,val,trainval}.pth, referit/referit_test.pth, flickr/flickr_val.pth."""
    images = write_images(root / "coco")
    unc = root / "splits" / "unc"
    unc.mkdir(parents=True)
    train = [
        (coco_name(1), 10, [4, 6, 20, 10], "left dog", {"r1": ["dog"]}),
        (coco_name(2), 11, [0.5, 1.5, 30.0, 20.0], "man in red", {}),
    ]
    val = [(coco_name(3), 12, [10, 12, 8, 9], "the person", {})]
    torch.save(train, unc / "unc_train.pth")
    torch.save(val, unc / "unc_val.pth")
    torch.save(train + val, unc / "unc_trainval.pth")
    referit = root / "splits" / "referit"
    referit.mkdir(parents=True)
    write_images(root / "referit_images", {5: (64, 64)}, name=lambda i: f"{i}.jpg")
    # Boxes as numpy arrays, as some releases store them: loaded through the numpy allowlist.
    torch.save(
        [("5.jpg", "5_1.mat", np.array([2.0, 3.0, 40.0, 50.0]), "sky", [])],
        referit / "referit_test.pth",
    )
    flickr = root / "splits" / "flickr"
    flickr.mkdir(parents=True)
    write_images(root / "flickr_images", {7: (48, 32)}, name=lambda i: f"{i}.jpg")
    torch.save([("7.jpg", [1, 2, 30, 20], "a red boat")], flickr / "flickr_val.pth")
    return images


def test_transvg_split_files(tmp_path):
    images = make_transvg(tmp_path)
    splits = tmp_path / "splits"
    rows = list(get_source("refcoco").rows(SourceArgs(root=splits, images=images)))
    # trainval (= train + val) is skipped unless asked for; boxes are xywh -> xyxy.
    assert [(r.split, r.expression, r.bbox_xyxy) for r in rows] == [
        ("train", "left dog", (4.0, 6.0, 24.0, 16.0)),
        ("train", "man in red", (0.5, 1.5, 30.5, 21.5)),
        ("val", "the person", (10.0, 12.0, 18.0, 21.0)),
    ]
    assert rows[0].image_id == coco_name(1)[:-4] and rows[0].ref_id == "10"
    tv = list(
        get_source("refcoco").rows(SourceArgs(root=splits, images=images, splits=["trainval"]))
    )
    assert len(tv) == 3 and {r.split for r in tv} == {"trainval"}

    # referit and flickr boxes are already xyxy; referit boxes here are numpy arrays.
    ref = list(
        get_source("referit").rows(SourceArgs(root=splits, images=tmp_path / "referit_images"))
    )
    assert [(r.split, r.bbox_xyxy, r.ref_id) for r in ref] == [
        ("test", (2.0, 3.0, 40.0, 50.0), "5_1")
    ]
    fl = list(
        get_source("flickr30k").rows(SourceArgs(root=splits, images=tmp_path / "flickr_images"))
    )
    assert [(r.split, r.bbox_xyxy, r.expression) for r in fl] == [
        ("val", (1.0, 2.0, 30.0, 20.0), "a red boat")
    ]

    result = prepare(
        "flickr30k",
        SourceArgs(root=splits, images=tmp_path / "flickr_images"),
        tmp_path / "fl",
        progress=False,
    )
    assert result.rows_kept == 1
    assert load_prepared(tmp_path / "fl")["val"][0]["bbox"] == pytest.approx([1, 2, 30, 20])
    with pytest.raises(VGError, match="no unc_testA.pth"):
        list(get_source("refcoco").rows(SourceArgs(root=splits, images=images, splits=["testA"])))
    with pytest.raises(VGError, match="--images"):
        get_source("referit").inputs(SourceArgs(root=splits))


def test_transvg_file_with_code_is_refused(tmp_path):
    images = write_images(tmp_path / "coco")
    unc = tmp_path / "splits" / "unc"
    unc.mkdir(parents=True)
    torch.save([(coco_name(1), 1, [0, 0, 5, 5], "x", Gadget())], unc / "unc_train.pth")
    with pytest.raises(VGError, match="refused to load.*Gadget"):
        list(get_source("refcoco").rows(SourceArgs(root=tmp_path / "splits", images=images)))
