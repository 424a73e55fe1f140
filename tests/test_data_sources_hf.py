"""Hugging Face dumps as a source: lmms-lab parquet, jxu124 save_to_disk, unknown layouts.

Each dump is built as a tiny fixture in a temp dir and checked row by row.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_data_sources import SIZES, coco_name, exif_photo, write_images

from vgdistill.data.manifest import load_prepared
from vgdistill.data.prepare import prepare
from vgdistill.data.sources import SourceArgs, get_source
from vgdistill.errors import VGError


def _jpeg(w, h, seed):
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def make_lmms_parquet(root):
    """lmms-lab/RefCOCO style: data/<split>-0000x-of-0000y.parquet, bbox xywh, answer list."""
    import datasets

    feats = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Sequence(datasets.Value("string")),
            "segmentation": datasets.Sequence(datasets.Value("float32")),
            "bbox": datasets.Sequence(datasets.Value("float32")),
            "iscrowd": datasets.Value("int8"),
            "file_name": datasets.Value("string"),
        }
    )
    data = root / "data"
    data.mkdir(parents=True)
    parts = {
        "val-00000-of-00002": [("q1", (60, 40), ["a cat", "the cat on the mat"], [5, 6, 20, 10])],
        "val-00001-of-00002": [("q2", (30, 30), ["tree"], [1.5, 2.5, 10, 12])],
        "testA-00000-of-00001": [("q3", (50, 50), ["man"], [0, 0, 50, 50])],
    }
    for name, items in parts.items():
        rows = {k: [] for k in feats}
        for k, (qid, (w, h), answers, box) in enumerate(items):
            rows["question_id"].append(qid)
            rows["image"].append({"bytes": _jpeg(w, h, k), "path": None})
            rows["question"].append("Please carefully observe the area circled in the image.")
            rows["answer"].append(answers)
            rows["segmentation"].append([0.0] * 6)
            rows["bbox"].append(box)
            rows["iscrowd"].append(0)
            rows["file_name"].append(f"COCO_train2014_{qid}.jpg")
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(data / f"{name}.parquet"))
    return root


def make_jxu_saved(root, coco_root):
    """jxu124/refcoco style, saved with save_to_disk: bbox xyxy, image_path relative, no pixels."""
    import datasets

    write_images(coco_root / "train2014")

    def rows(items):
        out = {
            k: []
            for k in (
                "ref_id",
                "image_id",
                "split",
                "sentences",
                "image_path",
                "bbox",
                "raw_image_info",
                "captions",
                "ann_id",
            )
        }
        for ref_id, image_id, split, sents, box in items:
            out["ref_id"].append(ref_id)
            out["image_id"].append(image_id)
            out["split"].append(split)
            out["sentences"].append(
                [
                    {"raw": s, "sent": s, "sent_id": k, "tokens": s.split()}
                    for k, s in enumerate(sents)
                ]
            )
            out["image_path"].append(f"coco/train2014/{coco_name(image_id)}")
            out["bbox"].append(box)
            w, h = SIZES[image_id]
            info = {"file_name": coco_name(image_id), "width": w, "height": h}
            out["raw_image_info"].append(json.dumps(info))
            out["captions"].append(sents)
            out["ann_id"].append(ref_id * 10)
        return datasets.Dataset.from_dict(out)

    dd = datasets.DatasetDict(
        {
            "train": rows([(1, 1, "train", ["red car", "car"], [4.0, 6.0, 24.0, 16.0])]),
            # The hub's "validation" and "test" files; the split column says val / testA.
            "validation": rows([(2, 2, "val", ["tall man"], [0.5, 1.5, 30.5, 21.5])]),
            "test": rows([(3, 3, "testA", ["woman"], [10.0, 12.0, 18.0, 21.0])]),
        }
    )
    dd.save_to_disk(str(root))
    return root


def test_hf_lmms_parquet(tmp_path):
    root = make_lmms_parquet(tmp_path / "lmms")
    rows = list(get_source("hf-refcoco").rows(SourceArgs(root=root)))
    assert [(r.split, r.expression, r.bbox_xyxy, r.ref_id) for r in rows] == [
        ("testA", "man", (0.0, 0.0, 50.0, 50.0), "q3"),
        ("val", "a cat", (5.0, 6.0, 25.0, 16.0), "q1"),
        ("val", "the cat on the mat", (5.0, 6.0, 25.0, 16.0), "q1"),
        ("val", "tree", (1.5, 2.5, 11.5, 14.5), "q2"),
    ]
    assert isinstance(rows[0].image, bytes) and rows[0].image_id == "COCO_train2014_q3"
    prepare("hf-refcoco", SourceArgs(root=root, splits=["val"]), tmp_path / "out", progress=False)
    dd = load_prepared(tmp_path / "out")
    assert list(dd) == ["val"] and len(dd["val"]) == 3
    assert [dd["val"][i]["width"] for i in range(3)] == [60, 60, 30]


def test_hf_jxu124_save_to_disk(tmp_path):
    coco = tmp_path / "coco_root"
    root = make_jxu_saved(tmp_path / "jxu", coco)
    with pytest.raises(VGError, match="--images"):
        list(get_source("hf-refcoco").rows(SourceArgs(root=root)))
    rows = list(get_source("hf-refcoco").rows(SourceArgs(root=root, images=coco)))
    assert [(r.split, r.expression, r.bbox_xyxy, r.image_id) for r in rows] == [
        ("train", "red car", (4.0, 6.0, 24.0, 16.0), "1"),
        ("train", "car", (4.0, 6.0, 24.0, 16.0), "1"),
        ("val", "tall man", (0.5, 1.5, 30.5, 21.5), "2"),
        ("testA", "woman", (10.0, 12.0, 18.0, 21.0), "3"),
    ]
    assert rows[0].image == str(coco / "train2014" / coco_name(1))
    assert [r.image_size for r in rows] == [SIZES[1], SIZES[1], SIZES[2], SIZES[3]]
    result = prepare(
        "hf-refcoco", SourceArgs(root=root, images=coco), tmp_path / "out", progress=False
    )
    assert {s: c["kept"] for s, c in result.manifest["counts"].items()} == {
        "train": 2,
        "val": 1,
        "testA": 1,
    }


def test_hf_width_height_columns_pick_the_frame(tmp_path):
    # A dump with width/height columns: an EXIF-tagged photo annotated upright is turned
    # upright; a row whose size fits neither frame is dropped with its reason.
    import datasets

    size = exif_photo(tmp_path / "p.jpg", 6, "upright")
    photo = (tmp_path / "p.jpg").read_bytes()
    rows = {
        "question_id": ["q1", "q2"],
        "image": [{"bytes": photo, "path": None}, {"bytes": _jpeg(40, 30, 0), "path": None}],
        "answer": [["the white thing"], ["noise"]],
        "bbox": [[6.0, 4.0, 24.0, 16.0], [1.0, 1.0, 10.0, 10.0]],
        "file_name": ["p.jpg", "n.jpg"],
        "width": [size[0], 41],
        "height": [size[1], 30],
    }
    (tmp_path / "dump").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "dump" / "val.parquet"))
    read = list(get_source("hf-refcoco").rows(SourceArgs(root=tmp_path / "dump")))
    assert [r.image_size for r in read] == [(48, 80), (41, 30)]
    result = prepare(
        "hf-refcoco", SourceArgs(root=tmp_path / "dump"), tmp_path / "out", progress=False
    )
    counts = result.manifest["counts"]["val"]
    assert counts["kept"] == 1 and counts["dropped"]["image size mismatch"] == 1
    assert result.manifest["exif"]["upright"] == 1


def test_unknown_layout_names_the_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"foo": [1], "bar": [2]}).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(VGError, match=r"\['bar', 'foo'\] match neither"):
        list(get_source("hf-refcoco").rows(SourceArgs(root=tmp_path / "x.parquet")))
    with pytest.raises(VGError, match="did you mean refcoco"):
        get_source("refcocoo")
