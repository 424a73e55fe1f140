"""prepare: cleaning with counted reasons, missing images, cache, --force, locking, atomicity."""

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vgdistill import atomic
from vgdistill.cli.app import app
from vgdistill.data.manifest import (
    DROP_REASONS,
    FORMAT_VERSION,
    MANIFEST,
    load_prepared,
    read_manifest,
)
from vgdistill.data.prepare import prepare
from vgdistill.data.shapes import COLOURS, SHAPES
from vgdistill.data.sources import SOURCES, RawRow, Source, SourceArgs
from vgdistill.errors import VGError

runner = CliRunner()


def _write(folder, name, w, h, seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path = folder / name
    Image.fromarray(arr).save(path, quality=90)
    return str(path)


def _register(monkeypatch, name, rows_fn, inputs_fn=lambda args: []):
    monkeypatch.setitem(
        SOURCES,
        name,
        Source(name=name, expects="test rows", options=("root",), inputs=inputs_fn, rows=rows_fn),
    )


@pytest.fixture
def messy(tmp_path, monkeypatch):
    """A source with one row of every kind prepare must handle."""
    img = tmp_path / "img"
    img.mkdir()
    a = _write(img, "a.jpg", 64, 48)
    b = _write(img, "b.jpg", 32, 32, seed=1)
    cut = img / "cut.jpg"
    cut.write_bytes((img / "a.jpg").read_bytes()[:300])
    rows = [
        RawRow(a, "  the   red dog ", (2, 3, 20, 30), "a", "1", "train"),  # kept, spaces collapsed
        RawRow(a, "the red dog", (2, 3, 20, 30), "a", "2", "train"),  # duplicate
        RawRow(a, "The RED dog", (2, 3, 20, 30), "a", "3", "train"),  # duplicate (case)
        RawRow(a, "   ", (2, 3, 20, 30), "a", "4", "train"),  # empty phrase
        RawRow(a, "wide", (50, 40, 80, 60), "a", "5", "train"),  # clipped to (50,40,64,48)
        RawRow(a, "nearly", (0, 0, 64.4, 48.3), "a", "6", "train"),  # rounding: not counted
        RawRow(a, "flat", (5, 5, 30, 5.5), "a", "7", "train"),  # degenerate
        RawRow(a, "away", (70, 10, 90, 20), "a", "8", "val"),  # box outside image
        RawRow(b, "blue", (1, 1, 9, 9), "b", "9", "val"),  # kept
        RawRow(str(img / "gone.jpg"), "gone", (1, 1, 9, 9), "g", "10", "val"),  # missing
        RawRow(str(cut), "cut", (1, 1, 9, 9), "c", "11", "val"),  # unreadable
        RawRow(b, "blue", (1, 1, 9, 9), "b", "12", "testA"),  # same row, other split: kept
    ]
    _register(monkeypatch, "messy", lambda args: iter(rows))
    present = [r for r in rows if "gone" not in r.image]
    _register(monkeypatch, "no-missing", lambda args: iter(present))
    return tmp_path


def test_every_row_is_accounted_for(messy):
    out = messy / "out"
    with pytest.raises(VGError, match=r"1 of 4 images are missing \(1 rows\), e.g. .*gone.jpg"):
        prepare("messy", SourceArgs(), out, progress=False)
    assert not out.exists()
    # An unreadable image is an error too without --skip-missing, and nothing is written.
    with pytest.raises(VGError, match=r"1 images could not be decoded, e.g. .*cut.jpg"):
        prepare("no-missing", SourceArgs(), out, progress=False)
    assert not out.exists()

    result = prepare("messy", SourceArgs(), out, skip_missing=True, progress=False)
    counts = result.manifest["counts"]
    zero = dict.fromkeys(DROP_REASONS, 0)
    assert counts["train"] == {
        "read": 7,
        "kept": 3,
        "clipped": 1,
        "dropped": {**zero, "duplicate": 2, "empty phrase": 1, "degenerate box": 1},
    }
    assert counts["val"] == {
        "read": 4,
        "kept": 1,
        "clipped": 0,
        "dropped": {**zero, "box outside image": 1, "missing image": 1, "unreadable image": 1},
    }
    assert counts["testA"]["kept"] == 1
    for c in counts.values():  # nothing vanishes: read = kept + every drop
        assert c["read"] == c["kept"] + sum(c["dropped"].values())

    dd = load_prepared(out)
    train = dd["train"]
    assert train["expression"] == ["the red dog", "wide", "nearly"]
    assert train["bbox"][1] == pytest.approx([50, 40, 64, 48])
    assert train["bbox"][2] == pytest.approx([0, 0, 64, 48])
    assert train["width"] == [64] * 3 and train["height"] == [48] * 3
    assert dd["val"]["expression"] == ["blue"]
    assert set(train.features) == {
        "image_index",
        "expression",
        "bbox",
        "image_id",
        "ref_id",
        "split",
        "source",
        "width",
        "height",
        "objects",
    }
    assert train["objects"] == [{"category": [], "bbox": []}] * 3  # this source has none
    manifest = read_manifest(out)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["source"] == "messy"
    assert manifest["unreadable_examples"] and "cut.jpg" in manifest["unreadable_examples"][0]


def test_cache_reuse_force_and_input_change(tmp_path, monkeypatch):
    img = tmp_path / "img"
    img.mkdir()
    a = _write(img, "a.jpg", 40, 30)
    calls = []
    annotations = tmp_path / "ann.txt"
    annotations.write_text("v1")

    def rows(args):
        calls.append(1)
        yield RawRow(a, annotations.read_text(), (1, 1, 10, 10), "a", "1", "train")

    _register(monkeypatch, "counted", rows, lambda args: [annotations])
    out = tmp_path / "out"
    first = prepare("counted", SourceArgs(), out, progress=False)
    arrow = sorted(out.rglob("*.arrow"))
    stamp = [p.stat().st_mtime_ns for p in arrow]
    again = prepare("counted", SourceArgs(), out, progress=False)
    assert not first.reused and again.reused and len(calls) == 1
    assert [p.stat().st_mtime_ns for p in arrow] == stamp
    assert again.manifest["fingerprint"] == first.manifest["fingerprint"]

    forced = prepare("counted", SourceArgs(), out, force=True, progress=False)
    assert not forced.reused and len(calls) == 2

    time.sleep(0.01)
    annotations.write_text("v2 changed")  # new size and mtime: the cache is stale
    changed = prepare("counted", SourceArgs(), out, progress=False)
    assert not changed.reused and len(calls) == 3
    assert load_prepared(out)["train"]["expression"] == ["v2 changed"]
    # Different arguments are a different dataset too.
    other = prepare("counted", SourceArgs(root=tmp_path), out, progress=False)
    assert not other.reused and other.manifest["args"] == {"root": str(tmp_path.resolve())}


def test_concurrent_prepare_into_one_out_is_refused(tmp_path, monkeypatch):
    img = tmp_path / "img"
    img.mkdir()
    a = _write(img, "a.jpg", 40, 30)
    started, release = threading.Event(), threading.Event()

    def slow(args):
        started.set()
        release.wait(30)
        yield RawRow(a, "slow", (1, 1, 10, 10), "a", "1", "train")

    _register(monkeypatch, "slow", slow)
    out = tmp_path / "out"
    errors = []

    def first():
        try:
            prepare("slow", SourceArgs(), out, progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(30)
    try:
        with pytest.raises(VGError, match="being written by another `vgdistill prepare`"):
            prepare("slow", SourceArgs(root=tmp_path), out, progress=False)
    finally:
        release.set()
        t.join(60)
    assert not errors
    assert load_prepared(out)["train"]["expression"] == ["slow"]


def test_interrupted_prepare_leaves_nothing_and_old_dataset_intact(tmp_path, monkeypatch):
    img = tmp_path / "img"
    img.mkdir()
    a = _write(img, "a.jpg", 40, 30)
    _register(
        monkeypatch, "good", lambda args: iter([RawRow(a, "ok", (1, 1, 9, 9), "a", "1", "t")])
    )
    out = tmp_path / "out"
    prepare("good", SourceArgs(), out, progress=False)

    def broken(args):
        yield RawRow(a, "ok", (1, 1, 9, 9), "a", "1", "t")
        raise KeyboardInterrupt

    _register(monkeypatch, "broken", broken)
    with pytest.raises(KeyboardInterrupt):
        prepare("broken", SourceArgs(), out, progress=False)
    assert read_manifest(out)["source"] == "good"  # the previous dataset still stands
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert leftovers in ([], [".out.lock"])


def test_out_guard_and_load_prepared_refusals(tmp_path, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    _register(monkeypatch, "none", lambda args: iter([]))
    with pytest.raises(VGError, match="not a vgdistill dataset"):
        prepare("none", SourceArgs(), user, progress=False)
    assert (user / "thesis.tex").read_text() == "precious"

    with pytest.raises(VGError, match="does not exist"):
        load_prepared(tmp_path / "nowhere")
    with pytest.raises(VGError, match=f"has no {MANIFEST}"):
        load_prepared(user)
    (user / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(VGError, match="newer vgdistill"):
        load_prepared(user)
    (user / MANIFEST).write_text(json.dumps({"format_version": 2}))
    with pytest.raises(VGError, match="older vgdistill.*prepare` command again"):
        load_prepared(user)
    (user / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION}))
    with pytest.raises(VGError, match="incomplete"):
        load_prepared(user)


def test_lock_helper_is_the_one_prepare_uses(tmp_path, monkeypatch):
    _register(monkeypatch, "none", lambda args: iter([]))
    out = tmp_path / "out"
    with atomic.exclusive(out), pytest.raises(VGError, match="being written"):
        prepare("none", SourceArgs(), out, progress=False)


def test_cli_list_and_errors(tmp_path, monkeypatch):
    result = runner.invoke(app, ["prepare", "--list"])
    assert result.exit_code == 0
    for name in ("refcoco", "refcoco+", "refcocog", "referit", "flickr30k", "hf-refcoco", "shapes"):
        assert name in result.output
    result = runner.invoke(app, ["prepare", "refcoco", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--root is required" in result.output
    result = runner.invoke(app, ["prepare", "nosuch", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown source" in result.output

    img = tmp_path / "img"
    img.mkdir()
    a = _write(img, "a.jpg", 40, 30)
    _register(
        monkeypatch, "cli", lambda args: iter([RawRow(a, "hi", (1, 1, 9, 9), "a", "1", "val")])
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["prepare", "cli", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 rows" in result.output and "dropped: duplicate" in result.output
    result = runner.invoke(app, ["prepare", "cli", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0 and "up to date" in result.output


def test_shapes_source_is_deterministic(tmp_path):
    import datasets

    counts = {"train": 12, "val": 4, "testA": 4, "testB": 4}
    a = prepare("shapes", SourceArgs(seed=3, split_rows=counts), tmp_path / "a", progress=False)
    b = prepare("shapes", SourceArgs(seed=3, split_rows=counts), tmp_path / "b", progress=False)
    c = prepare("shapes", SourceArgs(seed=4, split_rows=counts), tmp_path / "c", progress=False)
    assert a.rows_kept == 24 and a.manifest["args"]["seed"] == 3
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"] != c.manifest["fingerprint"]
    # The train mix is part of the dataset's identity: another mix is another dataset.
    mix = SourceArgs(seed=3, split_rows=counts, train_mix="relational")
    d = prepare("shapes", mix, tmp_path / "d", progress=False)
    assert d.manifest["args"]["train_mix"] == "relational"
    assert d.manifest["fingerprint"] != a.manifest["fingerprint"]

    def table(folder):
        dd = datasets.load_from_disk(str(folder))
        dd["images"] = dd["images"].cast_column("image", datasets.Image(decode=False))
        return {s: dd[s].to_list() for s in dd}

    ta, tb, tc = table(tmp_path / "a"), table(tmp_path / "b"), table(tmp_path / "c")
    assert {s: len(v) for s, v in ta.items() if s != "images"} == counts
    assert ta == tb  # same seed: same image bytes, phrases and boxes, row for row
    assert ta["images"][0]["image"]["bytes"] != tc["images"][0]["image"]["bytes"]
    row = ta["testA"][0]
    assert row["source"] == "shapes" and (row["width"], row["height"]) == (64, 64)
    x1, y1, x2, y2 = row["bbox"]
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    # Every object of the scene is written (for `vgdistill detector`); the target is one.
    objects = row["objects"]
    assert 3 <= len(objects["category"]) <= 5
    assert row["bbox"] in objects["bbox"]
    size, colour, shape = objects["category"][0].split()
    assert size in ("small", "large") and colour in COLOURS and shape in SHAPES
    # --rows spreads over the generator's default proportions and sums exactly.
    from vgdistill.data.sources.synthetic import shapes_counts

    spread = shapes_counts(SourceArgs(rows=101))
    assert sum(spread.values()) == 101 and set(spread) == {"train", "val", "testA", "testB"}


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """Three images under seven rows in three splits (one image shared by two splits)."""
    img = tmp_path / "img"
    img.mkdir()
    paths = [_write(img, f"{k}.jpg", 40 + 8 * k, 30, seed=k) for k in range(3)]
    rows = [
        RawRow(paths[k], f"thing {n}", (1, 1, 20, 20), str(k), str(n), split)
        for n, (k, split) in enumerate(
            [(0, "train"), (0, "train"), (1, "train"), (1, "val"), (2, "val"), (2, "val"), (1, "t")]
        )
    ]
    _register(monkeypatch, "shared", lambda args: iter(rows), lambda args: [img])
    return tmp_path, paths


def test_image_table_round_trip(shared):
    import datasets

    from vgdistill.data.image_table import ImageTable

    tmp_path, paths = shared
    out = tmp_path / "out"
    result = prepare("shared", SourceArgs(), out, progress=False)
    assert result.manifest["images"] == 3 and result.rows_kept == 7
    # One folder that datasets opens whole: the splits and the image table, each image once.
    whole = datasets.load_from_disk(str(out))
    assert sorted(whole) == ["images", "t", "train", "val"] and len(whole["images"]) == 3
    assert whole["images"].features["image"] == datasets.Image()
    assert whole["images"]["file"] == paths
    dd = load_prepared(out)
    assert sorted(dd) == ["t", "train", "val"]
    for split in dd.values():
        images = ImageTable.of(split)
        for row in split:
            path = paths[int(row["image_id"])]
            assert images.data(row["image_index"]) == Path(path).read_bytes()
            assert images.load_row(row, "x").size == (row["width"], row["height"])
    # The images' bytes are stored once: the table is the files plus a little framing.
    table_bytes = sum(p.stat().st_size for p in (out / "images").glob("*.arrow"))
    files_bytes = sum(os.path.getsize(p) for p in paths)
    assert files_bytes < table_bytes < 1.1 * files_bytes + 4096
    manifest = read_manifest(out)
    listed = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == listed - {MANIFEST}
    # Rows that did not come from a prepared folder have no image table.
    with pytest.raises(VGError, match="no image table"):
        ImageTable.of(datasets.Dataset.from_dict({"image_index": [0]}))
    # Older formats are refused with the way out.
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(VGError, match="older vgdistill.*with --force"):
        load_prepared(out)


def test_workers_write_the_same_folder(shared):
    tmp_path, _ = shared
    one = prepare("shared", SourceArgs(), tmp_path / "one", progress=False)
    two = prepare("shared", SourceArgs(), tmp_path / "two", workers=2, progress=False)
    assert one.manifest["files"] == two.manifest["files"]
    for name in one.manifest["files"]:
        if name.endswith(".arrow"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    with pytest.raises(VGError, match="--workers must be at least 1"):
        prepare("shared", SourceArgs(), tmp_path / "three", workers=0, progress=False)


def test_an_image_changed_in_place_is_detected(shared):
    from vgdistill.data.image_table import ImageTable

    tmp_path, paths = shared
    out = tmp_path / "out"
    prepare("shared", SourceArgs(), out, progress=False)
    assert prepare("shared", SourceArgs(), out, progress=False).reused
    folder_stat = os.stat(paths[1].rsplit("/", 1)[0])
    # Turn one image in place (same file name, same folder entry) and keep the folder's times.
    with Image.open(paths[1]) as im:
        im.transpose(Image.Transpose.ROTATE_180).save(paths[1], quality=90)
    os.utime(paths[1].rsplit("/", 1)[0], ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    again = prepare("shared", SourceArgs(), out, progress=False)
    assert not again.reused and "1 image file(s) changed" in again.note and "1.jpg" in again.note
    split = load_prepared(out)["val"]
    assert ImageTable.of(split).data(split[0]["image_index"]) == Path(paths[1]).read_bytes()
    assert prepare("shared", SourceArgs(), out, progress=False).reused


def test_a_damaged_folder_is_rebuilt_not_reported_up_to_date(shared):
    tmp_path, _ = shared
    out = tmp_path / "out"
    prepare("shared", SourceArgs(), out, progress=False)
    shard = out / "train" / "data-00000-of-00001.arrow"
    shard.unlink()
    with pytest.raises(VGError, match=r"damaged \(train/data-00000-of-00001.arrow is missing\)"):
        load_prepared(out)
    result = runner.invoke(app, ["prepare", "shared", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "is damaged" in said and "up to date" not in said
    assert len(load_prepared(out)["train"]) == 3
    with open(out / "images" / "data-00000-of-00001.arrow", "ab") as f:
        f.write(b"\0")  # a file of the wrong size
    again = prepare("shared", SourceArgs(), out, progress=False)
    assert not again.reused and "bytes instead of" in again.note
    assert prepare("shared", SourceArgs(), out, progress=False).reused


def test_an_up_to_date_prepare_removes_leftovers_of_killed_ones(shared):
    """Re-running the same prepare reuses the dataset and, holding the lock for a moment,
    removes the build folder and image cache a killed prepare left beside it."""
    from vgdistill import atomic

    tmp_path, _ = shared
    out = tmp_path / "out"
    prepare("shared", SourceArgs(), out, progress=False)
    leftovers = [tmp_path / ".out.a1b2c3d4.partial", tmp_path / ".out.cache.x_9y8z7w"]
    other = tmp_path / ".out2.a1b2c3d4.partial"  # another output's build: not ours to remove
    with atomic.exclusive(out):  # another command holds the lock: reused, leftovers wait
        for folder in [*leftovers, other]:
            folder.mkdir()
            (folder / "data-00000-of-00001.arrow").write_bytes(b"\0" * 1000)
        assert prepare("shared", SourceArgs(), out, progress=False).reused
        assert all(p.exists() for p in leftovers)
    assert prepare("shared", SourceArgs(), out, progress=False).reused
    assert not any(p.exists() for p in leftovers) and other.exists()
    assert len(load_prepared(out)["train"]) == 3


def test_prepare_benchmark_reports_its_figures(tmp_path, capsys):
    from vgdistill.tools.bench.prepare import main

    out = tmp_path / "f.json"
    main(["--images", "3,6", "--workers", "1", "--dir", str(tmp_path), "--json", str(out)])
    figures = json.loads(out.read_text())
    assert [(f["n_images"], f["rows"], f["images"]) for f in figures] == [(3, 21, 3), (6, 42, 6)]
    for f in figures:
        assert f["input_bytes"] < f["final_bytes"] < 1.1 * f["input_bytes"] + 65536
        assert 1.0 <= f["peak_over_final"] < 1.2 and f["rows_per_s"] > 0 and f["rss_mb"] > 0
    assert "ratio" in capsys.readouterr().out
    assert not any(p.name.startswith("prepared-") for p in tmp_path.iterdir())  # cleaned up
