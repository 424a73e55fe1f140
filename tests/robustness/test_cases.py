"""Bad inputs across every command, as a table: command line, bad input, expected outcome.

Each case builds its input in its own temp folder, runs the command in-process (Typer's
CliRunner) and checks the outcome:
- expected failure: exit code 2, exactly ONE non-empty line on stderr that starts with
  "error:", matches the case's pattern (what is wrong / what to do), and no traceback;
- expected success (unusual but valid input): exit code 0 and a sane result, e.g. a
  predicted box inside the image.
A crash (exit 1 "internal error", an exception escaping a command, a traceback) is recorded
as such and counted in the terminal summary line "robustness: ... crashes".
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from . import _files as F
from .conftest import RECIPE

runner = CliRunner()


@dataclass
class Env:
    """What a case may use: its own temp folder and the shared tiny assets."""

    tmp: Path
    data: Path
    run: Path
    ckpt: Path
    caplog: pytest.LogCaptureFixture

    @property
    def marker(self) -> Path:
        """A file that exists only if code from an untrusted file ran."""
        return self.tmp / "MARKER-code-ran"

    def file(self, name: str, writer: Callable[..., Path], *args: object) -> str:
        """Write `name` in the case folder with `writer`; its path as a CLI argument."""
        return str(writer(self.tmp / name, *args))


@dataclass(frozen=True)
class Case:
    """One row of the table."""

    id: str
    bad: str
    """The bad input, in words."""
    argv: Callable[[Env], list[str]]
    code: int = 2
    says: str = ""
    """Regex the one error line must match (code 2), or the output (code 0)."""
    then: Callable[[Env, object], None] | None = None
    """Further checks after the command returned."""
    known_bug: str = ""
    """Set while the case fails because of a reported bug elsewhere: the file and the bug."""


# ----------------------------------------------------------------------------- helpers


def predict(env: Env, image: str, *phrases: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`vgdistill predict CKPT IMAGE PHRASE... --json -`."""
    return ["predict", str(env.ckpt), image, *phrases, "--json", "-", "--device", "cpu", *extra]


def box_inside(width: int, height: int, n: int = 1) -> Callable[[Env, object], None]:
    """Check: the JSON output has the image size and `n` finite boxes inside the image."""

    def check(env: Env, result) -> None:  # noqa: ARG001
        record = json.loads(result.stdout)
        assert (record["width"], record["height"]) == (width, height)
        assert len(record["predictions"]) == n
        for p in record["predictions"]:
            x1, y1, x2, y2 = p["box"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, p

    return check


def no_marker(env: Env, result) -> None:  # noqa: ARG001
    """Check: no code from the untrusted file ran."""
    assert not env.marker.exists(), "code from an untrusted file RAN"


def recipe_file(env: Env, text: str, name: str = "r.toml") -> str:
    """A recipe file with `text`, extending the tiny recipe unless it says otherwise."""
    path = env.tmp / name
    path.write_text(text)
    return str(path)


def tiny_recipe(env: Env, body: str = "", distill: str = "") -> str:
    """The tiny recipe on the test data, distillation off (+ `distill` lines), plus `body`."""
    return recipe_file(
        env,
        f'extends = "{RECIPE}"\n[data]\npath = "{env.data}"\n'
        f'[distill]\nmodality = "none"\n{distill}{body}',
    )


def ckpt_copy(env: Env) -> Path:
    """A private copy of the tiny checkpoint, to damage."""
    dst = env.tmp / "ckpt"
    shutil.copytree(env.ckpt, dst)
    return dst


def truncate(path: Path, keep: float) -> None:
    """Cut `path` to `keep` of its size."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def other_arch_ckpt(env: Env) -> str:
    """A checkpoint whose weights come from another architecture (hidden_dim 32, not 64)."""
    from vgdistill.models.checkpoint import save_checkpoint
    from vgdistill.models.factory import build_model
    from vgdistill.recipe import load_recipe

    recipe = load_recipe(RECIPE, ['distill.modality="none"', "model.hidden_dim=32"])
    other = env.tmp / "other"
    save_checkpoint(build_model(recipe, load_weights=False), recipe, other)
    dst = ckpt_copy(env)
    shutil.copy(other / "model.safetensors", dst / "model.safetensors")  # config says 64
    return str(dst)


def foreign_tensors_ckpt(env: Env) -> str:
    """A checkpoint folder whose safetensors holds some other model's tensors."""
    import torch
    from safetensors.torch import save_file

    dst = ckpt_copy(env)
    save_file({"classifier.weight": torch.zeros(10, 4)}, str(dst / "model.safetensors"))
    return str(dst)


def damaged_ckpt(env: Env, how: Callable[[Path], None]) -> str:
    """A copy of the tiny checkpoint damaged by `how(folder)`."""
    dst = ckpt_copy(env)
    how(dst)
    return str(dst)


def flickr(env: Env, items: list, *flags: str, image_writers: dict | None = None) -> list[str]:
    """`prepare flickr30k` on a split file of (img_file, bbox_xyxy, phrase) tuples."""
    images = env.tmp / "images"
    images.mkdir(exist_ok=True)
    for name, writer in (image_writers or {"a.jpg": F.rgb_jpeg}).items():
        writer(images / name)
    F.split_file(env.tmp / "splits" / "flickr" / "flickr_val.pth", items)
    out = env.tmp / "out"
    return ["prepare", "flickr30k", "--root", str(env.tmp / "splits"), "--images", str(images),
            "--out", str(out), "--no-progress", *flags]  # fmt: skip


GOOD_ROW = ("a.jpg", [2.0, 2.0, 20.0, 20.0], "the good box")


def counted(reason: str, kept: int = 1, clipped: int = 0) -> Callable[[Env, object], None]:
    """Check: prepare kept `kept` rows and dropped one for `reason`, in the manifest and table."""

    def check(env: Env, result) -> None:
        manifest = json.loads((env.tmp / "out" / "prepare.json").read_text())
        counts = manifest["counts"]["val"]
        assert counts["kept"] == kept and counts["clipped"] == clipped, counts
        if reason:
            assert counts["dropped"][reason] == 1, counts
            assert re.search(rf"dropped: {reason}\s*│\s*1\b", result.stdout), result.stdout
        assert sum(counts["dropped"].values()) == counts["read"] - kept

    return check


def dataset_copy(env: Env, how: Callable[[Path], None]) -> str:
    """A private copy of the prepared tiny dataset, damaged by `how(folder)`."""
    dst = env.tmp / "data"
    shutil.copytree(env.data, dst)
    how(dst)
    return str(dst)


def newer_manifest(folder: Path) -> None:
    """Rewrite prepare.json as a future vgdistill would."""
    path = folder / "prepare.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))


def drop_arrow(folder: Path) -> None:
    """Delete the data files of the val split (the manifest still claims it)."""
    for f in (folder / "val").glob("*.arrow"):
        f.unlink()


def trapped_backbone(env: Env, weights: str) -> list[str]:
    """`train` with model.backbone_weights pointing at `weights` (an untrusted file)."""
    r = tiny_recipe(env, f'[model]\npreset = "tiny"\nbackbone_weights = "{weights}"\n')
    return ["train", r, "--out", str(env.tmp / "run"), "--no-progress"]


def refer_root(env: Env) -> list[str]:
    """The refer layout with a booby-trapped refs(unc).p."""
    root = env.tmp / "refer" / "refcoco"
    root.mkdir(parents=True)
    (root / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    F.evil_plain_pickle(root / "refs(unc).p", env.marker)
    images = env.tmp / "coco"
    images.mkdir()
    return ["prepare", "refcoco", "--root", str(env.tmp / "refer"), "--images", str(images),
            "--out", str(env.tmp / "out"), "--no-progress"]  # fmt: skip


def trapped_transvg(env: Env) -> list[str]:
    """import transvg on a .pth naming transvg.Args, with a `transvg` package importable."""
    F.fake_transvg_package(env.tmp / "site", env.marker)
    import sys

    sys.path.insert(0, str(env.tmp / "site"))  # removed by the runner after the case
    pth = F.evil_global_pth(env.tmp / "best_checkpoint.pth")
    return ["import", "transvg", str(pth), "--out", str(env.tmp / "imported")]


def truncation_warned(env: Env, result) -> None:
    """Check: the 1,000-word phrase was truncated with a warning naming the setting."""
    box_inside(48, 32)(env, result)
    assert re.search(r"truncated.*max_query_len|max_query_len.*truncated", env.caplog.text), (
        env.caplog.text
    )


def a_file(env: Env) -> str:
    """A user's file in the case folder, to be given as an output folder."""
    path = env.tmp / "notes.txt"
    path.write_text("precious")
    return str(path)


def file_intact(env: Env, result) -> None:  # noqa: ARG001
    """Check: the user's file given as --out is untouched."""
    assert (env.tmp / "notes.txt").read_text() == "precious"


def flip_byte(path: Path) -> None:
    """Flip one byte in the middle of a safetensors file's tensor data (past its header)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged_teacher(env: Env) -> str:
    """A random vgd-tiny-clip teacher folder (written by the real saver), a byte flipped."""
    from vgdistill.models.teacher import Teacher
    from vgdistill.recipe import DistillConfig

    folder = env.tmp / "teacher"
    cfg = DistillConfig(teacher="vgd-tiny-clip", teacher_pretrained="")
    Teacher.from_config(cfg, load_weights=False).save(folder)
    flip_byte(folder / "open_clip_model.safetensors")
    return str(folder)


def damaged_detector(env: Env) -> str:
    """The weights file of a 2-step `vgdistill detector` on the test data, a byte flipped."""
    from vgdistill.recipe import load_recipe
    from vgdistill.training.detector import fit_detector

    out = env.tmp / "detector"
    sets = [f"data.path={json.dumps(str(env.data))}", "detector.steps=2", "detector.batch_size=4"]
    fit_detector(load_recipe(RECIPE, [*sets, "data.num_workers=0"]), out, progress=False)
    flip_byte(out / "detr.safetensors")
    return str(out / "detr.safetensors")


def train_with(env: Env, *sets: str) -> list[str]:
    """`train` of the tiny recipe on the test data with `sets`."""
    argv = ["train", tiny_recipe(env), "--out", str(env.tmp / "run"), "--no-progress"]
    return argv + [a for s in sets for a in ("--set", s)]


def newest_state(run: Path) -> Path:
    """The newest resumable state of a run folder."""
    from vgdistill.training.rundir import RunDir

    return RunDir(run).states()[-1]


def flip_state_byte(run: Path) -> None:
    """Damage the newest state's weights, and make the run unfinished so --resume loads it."""
    flip_byte(newest_state(run) / "model.safetensors")
    (run / "train_summary.json").unlink()


def resume_damaged(env: Env, damage: Callable[[Path], None], *sets: str) -> list[str]:
    """`train --resume` of a damaged copy of the shared run, with its own recipe + `sets`."""
    run = env.tmp / "run"
    shutil.copytree(env.run, run)
    recipe = env.tmp / "r.toml"
    shutil.copy(newest_state(run) / "recipe.toml", recipe)
    damage(run)
    argv = ["train", str(recipe), "--out", str(run), "--resume", "--no-progress"]
    return argv + [a for s in sets for a in ("--set", s)]


TINY_CLIP = 'teacher = "vgd-tiny-clip"\nteacher_pretrained = ""\n'
LONG = " ".join(["the", "big", "red", "square", "left", "of", "a", "small", "blue", "circle"] * 100)


# ----------------------------------------------------------------------------- the table

# fmt: off
CASES: list[Case] = [
    # --- images (predict) ---------------------------------------------------------------
    Case("image-missing", "image file does not exist",
         lambda e: predict(e, str(e.tmp / "nope.jpg"), "a box"), says=r"image not found: .*nope"),
    Case("image-zero-bytes", "0-byte .jpg",
         lambda e: predict(e, e.file("z.jpg", F.zero_bytes), "a box"),
         says=r"z\.jpg: the file is empty \(0 bytes\)"),
    Case("image-truncated-jpeg", "JPEG cut in half",
         lambda e: predict(e, e.file("t.jpg", F.truncated_jpeg), "a box"),
         says=r"t\.jpg: unreadable or truncated"),
    Case("image-not-an-image", "text file named .png",
         lambda e: predict(e, e.file("n.png", F.not_an_image), "a box"),
         says=r"n\.png: not an image"),
    Case("image-is-a-folder", "a folder given as the image",
         lambda e: predict(e, str(e.tmp), "a box"), says=r"expected an image file, got a folder"),
    Case("image-decompression-bomb", "PNG claiming 10000x10000 pixels",
         lambda e: predict(e, e.file("bomb.png", F.decompression_bomb), "a box"),
         says=r"bomb\.png: .*(decompression bomb).*VGDISTILL_MAX_PIXELS"),
    Case("image-grayscale", "8-bit grayscale PNG", code=0,
         argv=lambda e: predict(e, e.file("g.png", F.grayscale), "a box"),
         then=box_inside(40, 30)),
    Case("image-cmyk", "CMYK JPEG", code=0,
         argv=lambda e: predict(e, e.file("c.jpg", F.cmyk_jpeg), "a box"),
         then=box_inside(50, 30)),
    Case("image-rgba", "RGBA PNG, half transparent", code=0,
         argv=lambda e: predict(e, e.file("a.png", F.rgba_png), "a box"),
         then=box_inside(40, 40)),
    Case("image-16bit", "16-bit grayscale PNG", code=0,
         argv=lambda e: predict(e, e.file("d.png", F.png16), "a box"),
         then=box_inside(36, 24)),
    Case("image-palette-alpha", "palette PNG with a transparent colour", code=0,
         argv=lambda e: predict(e, e.file("p.png", F.palette_transparent), "a box"),
         then=box_inside(30, 20)),
    Case("image-exif-rotated", "JPEG stored 80x40, EXIF orientation 6", code=0,
         argv=lambda e: predict(e, e.file("r.jpg", F.exif_rotated), "a box"),
         then=box_inside(40, 80)),  # upright size, and the box lies inside it
    Case("image-1x1", "a 1x1 image", code=0,
         argv=lambda e: predict(e, e.file("one.png", F.one_pixel), "a box"),
         then=box_inside(1, 1)),
    Case("image-wrong-extension", "PNG bytes in a .jpg file", code=0,
         argv=lambda e: predict(e, e.file("png.jpg", F.png_named_jpg), "a box"),
         then=box_inside(30, 30)),
    Case("image-bad-out-extension", "--out drawing.xyz",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "a box",
                           extra=("--out", str(e.tmp / "drawing.xyz"))),
         says=r"unknown image extension"),
    # --- phrases (predict) --------------------------------------------------------------
    Case("phrase-empty", '""', lambda e: predict(e, e.file("i.png", F.rgb_png), ""),
         says=r"phrase is empty"),
    Case("phrase-whitespace", "spaces, tab, newline",
         lambda e: predict(e, e.file("i.png", F.rgb_png), " \t\n "), says=r"phrase is empty"),
    Case("phrase-one-of-two-empty", 'a good phrase and ""',
         lambda e: predict(e, e.file("i.png", F.rgb_png), "a box", "  "),
         says=r"phrase 2 is empty"),
    Case("phrase-none", "no phrase at all",
         lambda e: predict(e, e.file("i.png", F.rgb_png)), says=r"at least one phrase"),
    Case("phrase-1000-words", "1,000 words (max_query_len is 12)", code=0,
         argv=lambda e: predict(e, e.file("i.png", F.rgb_png), LONG), then=truncation_warned),
    Case("phrase-non-ascii", "accents, CJK", code=0,
         argv=lambda e: predict(e, e.file("i.png", F.rgb_png), "l'éléphant à gauche 左边的猫"),
         then=box_inside(48, 32)),
    Case("phrase-emoji", "emoji in words", code=0,
         argv=lambda e: predict(e, e.file("i.png", F.rgb_png), "the 🐈‍⬛ cat", "the 🔴 circle"),
         then=box_inside(48, 32, n=2)),
    Case("phrase-emoji-only", "emoji only (no letter or digit)",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "🐈‍⬛🔴"),
         says=r"phrase is empty \(no letters or digits\)"),
    Case("phrase-nul-only", "NUL characters only",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "a box", "\x00\x00 \x00"),
         says=r"phrase 2 is empty \(no letters or digits\)"),
    Case("phrase-zero-width-only", "zero-width space, joiner and BOM only",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "\u200b\u200d\ufeff"),
         says=r"phrase is empty \(no letters or digits\)"),
    Case("phrase-lone-surrogate", "a lone surrogate (undecodable argv bytes)",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "a \udcff box"),
         says=r"phrase holds the invalid code point U\+DCFF"),
    Case("batch-lone-surrogate", "--batch line whose phrase holds a lone surrogate", code=0,
         argv=lambda e: ["predict", str(e.ckpt), "--batch", _batch(e, [
             {"image": e.file("i.png", F.rgb_png), "phrase": "a \ud800 box"},
             {"image": str(e.tmp / "i.png"), "phrase": "a box"}]),
             "--out", str(e.tmp / "res.jsonl")],
         says=r"1 line\(s\) skipped", then=lambda e, r: _first_line_skipped(e)),
    Case("phrase-control-chars", "NUL, BEL, ESC sequences", code=0,
         argv=lambda e: predict(e, e.file("i.png", F.rgb_png), "the\x00 red\x07 \x1b[31mbox\x7f"),
         then=box_inside(48, 32)),
    Case("phrase-rtl-zero-width", "RTL override and zero-width joiners", code=0,
         argv=lambda e: predict(e, e.file("i.png", F.rgb_png), "\u202eleft\u200b\u200d box"),
         then=box_inside(48, 32)),
    Case("batch-empty-phrase", "--batch line with an empty phrase",
         lambda e: ["predict", str(e.ckpt), "--batch", _batch(e, [
             {"image": e.file("i.png", F.rgb_png), "phrase": "ok"},
             {"image": str(e.tmp / "i.png"), "phrase": "   "}]),
             "--out", str(e.tmp / "res.jsonl")],
         says=r"line 2: 'phrase' is empty"),
    Case("batch-bad-json", "--batch line that is not JSON",
         lambda e: ["predict", str(e.ckpt), "--batch", _batch(e, ["{not json"]),
                    "--out", str(e.tmp / "res.jsonl")],
         says=r"line 1: not valid JSON"),
    Case("batch-missing-image", "--batch line naming a missing image",
         lambda e: ["predict", str(e.ckpt), "--batch", _batch(e, [
             {"image": str(e.tmp / "gone.jpg"), "phrase": "a box"}]),
             "--out", str(e.tmp / "res.jsonl")],
         says=r"line 1: image not found"),
    Case("batch-unreadable-image", "--batch line naming a truncated JPEG",
         lambda e: ["predict", str(e.ckpt), "--batch", _batch(e, [
             {"image": e.file("t.jpg", F.truncated_jpeg), "phrase": "a box"}]),
             "--out", str(e.tmp / "res.jsonl")],
         says=r"line 1: .*truncated"),
    # --- boxes (prepare, from a TransVG/flickr split file) ------------------------------
    Case("box-zero-area", "x1 == x2", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [5.0, 5.0, 5.0, 20.0], "flat")]),
         then=counted("degenerate box")),
    Case("box-negative-size", "x2 < x1 and y2 < y1", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [30.0, 20.0, 10.0, 5.0], "inverted")]),
         then=counted("degenerate box")),
    Case("box-outside-image", "box right of a 48-px-wide image", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [60.0, 5.0, 90.0, 20.0], "away")]),
         then=counted("box outside image")),
    Case("box-partly-outside", "negative corner, box overlaps the image", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [-10.0, -10.0, 10.0, 10.0], "corner")]),
         then=counted("", kept=2, clipped=1)),
    Case("box-nan", "NaN coordinate in the source file", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [float("nan"), 1.0, 9.0, 9.0], "nan")]),
         then=counted("degenerate box")),
    Case("box-inf", "infinite coordinate in the source file", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [1.0, 1.0, float("inf"), 9.0], "inf")]),
         then=counted("degenerate box")),
    Case("box-three-numbers", "bbox with 3 numbers",
         lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [1.0, 2.0, 3.0], "short")]),
         says=r"flickr_val\.pth item 1: bbox must be 4 numbers"),
    Case("box-not-numbers", "bbox is a string",
         lambda e: flickr(e, [GOOD_ROW, ("a.jpg", "abcd", "text box")]),
         says=r"item 1: bbox must be 4 numbers"),
    Case("row-empty-phrase", "row with an empty phrase", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("a.jpg", [1.0, 1.0, 9.0, 9.0], "  ")]),
         then=counted("empty phrase")),
    # --- images met by prepare ----------------------------------------------------------
    Case("prepare-image-missing", "a row's image file is missing",
         lambda e: flickr(e, [GOOD_ROW, ("gone.jpg", [1.0, 1.0, 9.0, 9.0], "x")]),
         says=r"1 of 2 images are missing.*gone\.jpg.*--skip-missing"),
    Case("prepare-image-missing-skipped", "missing image with --skip-missing", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("gone.jpg", [1.0, 1.0, 9.0, 9.0], "x")],
                               "--skip-missing"),
         then=counted("missing image")),
    Case("prepare-image-truncated", "a row's JPEG is truncated",
         lambda e: flickr(e, [GOOD_ROW, ("t.jpg", [1.0, 1.0, 9.0, 9.0], "x")],
                          image_writers={"a.jpg": F.rgb_jpeg, "t.jpg": F.truncated_jpeg}),
         says=r"1 images could not be decoded.*t\.jpg.*--skip-missing"),
    Case("prepare-image-zero-bytes-skipped", "0-byte image with --skip-missing", code=0,
         argv=lambda e: flickr(e, [GOOD_ROW, ("z.jpg", [1.0, 1.0, 9.0, 9.0], "x")],
                               "--skip-missing",
                               image_writers={"a.jpg": F.rgb_jpeg, "z.jpg": F.zero_bytes}),
         then=counted("unreadable image")),
    Case("prepare-unusual-images", "EXIF-rotated, CMYK, 16-bit, RGBA, 1x1 images", code=0,
         argv=lambda e: flickr(e, [
             ("r.jpg", [1.0, 1.0, 30.0, 70.0], "tall box"),  # fits only the upright 40x80
             ("c.jpg", [1.0, 1.0, 9.0, 9.0], "cmyk"), ("d.png", [1.0, 1.0, 9.0, 9.0], "deep"),
             ("a.png", [1.0, 1.0, 9.0, 9.0], "alpha"), ("one.png", [0.0, 0.0, 1.0, 1.0], "dot")],
             image_writers={"r.jpg": F.exif_rotated, "c.jpg": F.cmyk_jpeg, "d.png": F.png16,
                            "a.png": F.rgba_png, "one.png": F.one_pixel}),
         then=lambda e, r: _unusual_images_kept(e)),
    Case("prepare-bomb", "a decompression-bomb image",
         lambda e: flickr(e, [("bomb.png", [1.0, 1.0, 9.0, 9.0], "x")],
                          image_writers={"bomb.png": F.decompression_bomb}),
         says=r"could not be decoded.*bomb\.png.*decompression bomb"),
    # --- prepare arguments --------------------------------------------------------------
    Case("prepare-unknown-source", "source name with a typo",
         lambda e: ["prepare", "refcocoo", "--out", str(e.tmp / "o")],
         says=r"unknown source 'refcocoo' \(did you mean refcoco"),
    Case("prepare-out-is-user-folder", "--out holds the user's own files",
         lambda e: ["prepare", "shapes", "--rows", "8", "--out", _user_folder(e)],
         says=r"not a vgdistill dataset.*choose a new or empty folder",
         then=lambda e, r: _user_folder_intact(e)),
    Case("prepare-out-is-file", "--out names a file",
         lambda e: ["prepare", "shapes", "--rows", "8", "--out", e.file("f.txt", F.not_an_image)],
         says=r"is a file; give a folder"),
    # --- recipes ------------------------------------------------------------------------
    Case("recipe-unknown-key", "train.lrr",
         lambda e: ["recipe", "check", recipe_file(e, "[train]\nlrr = 1e-3\n")],
         says=r"unknown key 'train\.lrr' \(did you mean train\.lr\?\)"),
    Case("recipe-unknown-section", "[trian]",
         lambda e: ["recipe", "check", recipe_file(e, "[trian]\nlr = 1e-3\n")],
         says=r"unknown section 'trian' \(did you mean train\?\)"),
    Case("recipe-wrong-type", 'train.lr = "fast"',
         lambda e: ["recipe", "check", recipe_file(e, '[train]\nlr = "fast"\n')],
         says=r"train\.lr must be float, got str 'fast'"),
    Case("recipe-missing-file", "recipe path that does not exist",
         lambda e: ["recipe", "check", str(e.tmp / "nope.toml")], says=r"recipe not found"),
    Case("recipe-circular-extends", "a.toml extends b.toml extends a.toml",
         lambda e: ["recipe", "check", _circular(e)],
         says=r"circular 'extends' \(a\.toml -> b\.toml -> a\.toml\)"),
    Case("recipe-extends-missing", "extends names a missing file",
         lambda e: ["recipe", "check", recipe_file(e, 'extends = "base.toml"\n')],
         says=r"recipe not found: .*base\.toml"),
    Case("recipe-negative-lr", "--set train.lr=-1e-4",
         lambda e: ["recipe", "show", str(RECIPE), "--set", "train.lr=-1e-4"],
         says=r"train\.lr must be >= 0, got -0\.0001"),
    Case("recipe-negative-alpha", "distill.alpha = -0.5",
         lambda e: ["recipe", "check", recipe_file(e, "[distill]\nalpha = -0.5\n")],
         says=r"distill\.alpha must be >= 0"),
    Case("recipe-bad-choice", 'distill.loss = "l3"',
         lambda e: ["recipe", "check", recipe_file(e, '[distill]\nloss = "l3"\n')],
         says=r"distill\.loss = 'l3' is not one of: cosine, l1, mse"),
    Case("recipe-invalid-toml", "unclosed table header",
         lambda e: ["recipe", "check", recipe_file(e, "[train\nlr = 1\n")],
         says=r"not valid TOML"),
    Case("recipe-binary", "a binary file as the recipe",
         lambda e: ["recipe", "check", e.file("r.toml", F.binary_garbage)], says=r"not valid TOML"),
    Case("recipe-set-no-equals", "--set train.lr",
         lambda e: ["recipe", "show", str(RECIPE), "--set", "train.lr"],
         says=r"--set needs section\.key=value"),
    Case("recipe-unknown-preset", 'model.preset = "huge"',
         lambda e: ["recipe", "check", recipe_file(e, '[model]\npreset = "huge"\n')],
         says=r"unknown model\.preset 'huge'; valid presets: .*tiny"),
    Case("train-bad-recipe", "train with --set train.batch_size=0",
         lambda e: ["train", str(RECIPE), "--set", "train.batch_size=0",
                    "--out", str(e.tmp / "run"), "--no-progress"],
         says=r"train\.batch_size must be > 0"),
    Case("train-missing-data", "train with data.path that does not exist",
         lambda e: ["train", tiny_recipe(e), "--set", f'data.path="{e.tmp / "nodata"}"',
                    "--out", str(e.tmp / "run"), "--no-progress"],
         says=r"nodata does not exist: run `vgdistill prepare"),
    Case("train-missing-teacher", "distillation on, teacher folder does not exist",
         lambda e: ["train", tiny_recipe(e), "--set", 'distill.modality="both"',
                    "--set", f'distill.teacher="{e.tmp / "noteacher"}"',
                    "--out", str(e.tmp / "run"), "--no-progress"],
         says=r"distill\.teacher"),
    Case("train-existing-run", "train into a finished run without --resume",
         lambda e: ["train", tiny_recipe(e), "--out", str(e.run), "--no-progress"],
         says=r"already holds a run; add --resume"),
    # --- checkpoints --------------------------------------------------------------------
    Case("ckpt-missing-predict", "predict with a checkpoint folder that does not exist",
         lambda e: ["predict", str(e.tmp / "nock"), e.file("i.png", F.rgb_png), "a box"],
         says=r"checkpoint not found: .*nock"),
    Case("ckpt-missing-eval", "eval with a run folder that does not exist",
         lambda e: ["eval", str(e.tmp / "norun")], says=r"not found: .*norun"),
    Case("ckpt-not-a-checkpoint", "eval of a folder without model.safetensors",
         lambda e: ["eval", str(e.tmp)], says=r"is not a checkpoint: expected model\.safetensors"),
    Case("ckpt-truncated-safetensors", "model.safetensors cut to 60 %",
         lambda e: ["predict", damaged_ckpt(e, lambda d: truncate(d / "model.safetensors", 0.6)),
                    e.file("i.png", F.rgb_png), "a box"],
         says=r"model\.safetensors: corrupt or unreadable safetensors"),
    Case("ckpt-zero-byte-safetensors", "eval of a 0-byte model.safetensors",
         lambda e: ["eval", damaged_ckpt(e, lambda d: truncate(d / "model.safetensors", 0.0)),
                    "--data", str(e.data)],
         says=r"corrupt or unreadable safetensors"),
    Case("ckpt-other-architecture", "weights of hidden_dim 32 under a hidden_dim 64 config",
         lambda e: ["eval", other_arch_ckpt(e), "--data", str(e.data)],
         says=r"does not fit this model architecture: .*shape mismatch"),
    Case("ckpt-foreign-tensors", "safetensors of an unrelated model",
         lambda e: ["eval", foreign_tensors_ckpt(e), "--data", str(e.data)],
         says=r"does not fit this model architecture: missing .*unexpected classifier"),
    Case("ckpt-no-config", "config.json deleted",
         lambda e: ["eval", damaged_ckpt(e, lambda d: (d / "config.json").unlink())],
         says=r"missing config\.json"),
    Case("ckpt-corrupt-config", "config.json cut in half",
         lambda e: ["eval", damaged_ckpt(e, lambda d: truncate(d / "config.json", 0.5))],
         says=r"config\.json: corrupt"),
    Case("pickle-exec-import-transvg", ".pth whose pickle runs `import transvg` + writes a file",
         lambda e: ["import", "transvg", e.file("ckpt.pth", F.evil_exec_pth, e.marker),
                    "--out", str(e.tmp / "imported")],
         says=r"refused to load", then=no_marker),
    Case("pickle-global-transvg", ".pth naming transvg.Args, a transvg package importable",
         trapped_transvg, says=r"refused to load", then=no_marker),
    Case("pickle-backbone-weights", "train with model.backbone_weights = a trapped .pth",
         lambda e: trapped_backbone(e, e.file("bb.pth", F.evil_exec_pth, e.marker)),
         says=r"refused to load", then=no_marker),
    Case("pickle-split-file", "prepare flickr30k from a trapped split .pth",
         lambda e: _trapped_flickr(e),
         says=r"refused to load", then=no_marker),
    Case("pickle-refer-refs", "prepare refcoco whose refs(unc).p runs code",
         refer_root, says=r"refused to load this pickle", then=no_marker),
    Case("pickle-teacher-init", "teacher --init a trapped .pth",
         lambda e: ["teacher", tiny_recipe(e, distill=TINY_CLIP),
                    "--init", e.file("clip.pth", F.evil_exec_pth, e.marker),
                    "--out", str(e.tmp / "teacher"), "--epochs", "1"],
         says=r"refused to load", then=no_marker),
    Case("import-missing-pth", "import transvg of a missing file",
         lambda e: ["import", "transvg", str(e.tmp / "none.pth"), "--out", str(e.tmp / "o")],
         says=r"not found: .*none\.pth"),
    Case("import-zero-byte-pth", "import transvg of a 0-byte file",
         lambda e: ["import", "transvg", e.file("z.pth", F.zero_bytes), "--out", str(e.tmp / "o")],
         says=r"z\.pth: the file is empty \(0 bytes\)"),
    Case("import-other-model", "import transvg of a safe .pth from another model (a classifier)",
         lambda e: ["import", "transvg", e.file("cls.pth", F.other_model_pth),
                    "--out", str(e.tmp / "o")],
         says=r"cls\.pth"),
    Case("predict-absent-gpu", "predict --device cuda:7 (no such GPU)",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "a box")[:-2] + ["--device", "cuda:7"],
         says=r"--device cuda:7: (no CUDA GPU|only \d+ CUDA device)"),
    Case("batch-out-is-input", "predict --batch F --out F (would overwrite its input)",
         lambda e: ["predict", str(e.ckpt), "--batch", _batch(e, ["{}"]),
                    "--out", str(e.tmp / "batch.jsonl")],
         says=r"--out must differ from --batch"),
    Case("eval-bad-control", "eval --control bogus",
         lambda e: ["eval", str(e.ckpt), "--control", "bogus"], says=r"--control 'bogus'"),
    # --- datasets -----------------------------------------------------------------------
    Case("data-missing", "eval --data folder that does not exist",
         lambda e: ["eval", str(e.ckpt), "--data", str(e.tmp / "gone")],
         says=r"gone does not exist: run `vgdistill prepare SOURCE --out"),
    Case("data-newer-format", "prepare.json with format_version 99",
         lambda e: ["eval", str(e.ckpt), "--data", dataset_copy(e, newer_manifest)],
         says=r"written by a newer vgdistill \(format 99.*upgrade vgdistill"),
    Case("data-no-manifest", "a folder that prepare did not write",
         lambda e: ["eval", str(e.ckpt), "--data", dataset_copy(
             e, lambda d: (d / "prepare.json").unlink())],
         says=r"has no prepare\.json: not a \(complete\) `vgdistill prepare` output"),
    Case("data-corrupt-manifest", "prepare.json is not JSON",
         lambda e: ["eval", str(e.ckpt), "--data", dataset_copy(
             e, lambda d: (d / "prepare.json").write_text("{oops"))],
         says=r"unreadable manifest.*run prepare --force"),
    Case("data-arrow-deleted", "the val split's .arrow files deleted",
         lambda e: ["eval", str(e.ckpt), "--data", dataset_copy(e, drop_arrow),
                    "--split", "val"],
         says=r"run prepare --force"),
    Case("data-unknown-split", "eval --split nosuch",
         lambda e: ["eval", str(e.ckpt), "--data", str(e.data), "--split", "nosuch"],
         says=r"no split 'nosuch'.*it has: .*val"),
    Case("teacher-missing-data", "teacher with data.path that does not exist",
         lambda e: ["teacher", tiny_recipe(e, distill=TINY_CLIP),
                    "--set", f'data.path="{e.tmp / "nodata"}"', "--out", str(e.tmp / "t")],
         says=r"nodata does not exist"),
    Case("detector-missing-data", "detector with data.path that does not exist",
         lambda e: ["detector", tiny_recipe(e), "--set", f'data.path="{e.tmp / "nodata"}"',
                    "--out", str(e.tmp / "d")],
         says=r"nodata does not exist"),
    Case("detector-zero-steps", "detector --steps 0",
         lambda e: ["detector", tiny_recipe(e), "--steps", "0", "--out", str(e.tmp / "d")],
         says=r"--steps must be > 0"),
    Case("detector-negative-lr", "detector --lr -1",
         lambda e: ["detector", tiny_recipe(e), "--lr", "-1", "--out", str(e.tmp / "d")],
         says=r"--lr must be > 0"),
    Case("detector-missing-weights", "train with model.detr_checkpoint that does not exist",
         lambda e: ["train", tiny_recipe(e), "--out", str(e.tmp / "run"), "--no-progress",
                    "--set", f'model.detr_checkpoint="{e.tmp / "detr.safetensors"}"'],
         says=r"not found.*write one with `vgdistill detector"),
    # --- ablate -------------------------------------------------------------------------
    Case("ablate-missing-recipe", "ablate a recipe that does not exist",
         lambda e: ["ablate", str(e.tmp / "nope.toml"), "--out", str(e.tmp / "abl")],
         says=r"recipe not found"),
    Case("ablate-bad-value", "ablate --loss l3",
         lambda e: ["ablate", str(RECIPE), "--loss", "l3", "--out", str(e.tmp / "abl")],
         says=r"l3.*cosine"),
    # --- outputs that cannot be written (read-only mounts: tests/robustness/test_fs_faults.py)
    Case("out-file-train", "train --out an existing file",
         lambda e: ["train", tiny_recipe(e), "--out", a_file(e), "--no-progress"],
         says=r"--out .*notes\.txt exists and is not a folder", then=file_intact),
    Case("out-file-prepare", "prepare --out an existing file",
         lambda e: ["prepare", "shapes", "--rows", "8", "--out", a_file(e), "--no-progress"],
         says=r"notes\.txt (exists and is not a folder|is a file; give a folder)",
         then=file_intact),
    Case("out-file-detector", "detector --out an existing file",
         lambda e: ["detector", tiny_recipe(e), "--out", a_file(e)],
         says=r"notes\.txt exists and is not a folder", then=file_intact),
    Case("out-file-teacher", "teacher --out an existing file",
         lambda e: ["teacher", tiny_recipe(e, distill=TINY_CLIP), "--out", a_file(e),
                    "--epochs", "1"],
         says=r"notes\.txt exists and is not a folder", then=file_intact),
    Case("out-file-import", "import transvg --out an existing file",
         lambda e: ["import", "transvg", e.file("cls.pth", F.other_model_pth), "--out",
                    a_file(e)],
         says=r"notes\.txt exists and is not a folder", then=file_intact),
    Case("out-file-ablate", "ablate --out an existing file",
         lambda e: ["ablate", tiny_recipe(e), "--seeds", "1", "--out", a_file(e)],
         says=r"notes\.txt exists and is not a folder", then=file_intact),
    Case("out-below-a-file", "train --out a path below an existing file",
         lambda e: ["train", tiny_recipe(e), "--out", a_file(e) + "/run", "--no-progress"],
         says=r"notes\.txt is a file, not a folder", then=file_intact),
    Case("out-json-is-a-folder", "eval --json naming a folder",
         lambda e: ["eval", str(e.ckpt), "--json", str(e.tmp)], says=r"--json .* is a folder"),
    Case("out-predict-is-a-folder", "predict --out naming a folder",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "a box", extra=("--out", str(e.tmp))),
         says=r"--out .* is a folder"),
    # --- silent corruption and the resume check
    Case("ckpt-flipped-byte-eval", "one byte flipped inside best/'s tensor data",
         lambda e: ["eval", damaged_ckpt(e, lambda d: flip_byte(d / "model.safetensors")),
                    "--data", str(e.data)],
         says=r"model\.safetensors is damaged: its SHA-256"),
    Case("ckpt-flipped-byte-predict", "predict with a flipped byte in the tensor data",
         lambda e: predict(e, e.file("i.png", F.rgb_png), "a box")[:1]
         + [damaged_ckpt(e, lambda d: flip_byte(d / "model.safetensors"))]
         + predict(e, str(e.tmp / "i.png"), "a box")[2:],
         says=r"model\.safetensors is damaged: its SHA-256"),
    Case("state-flipped-byte", "--resume from a state with a flipped byte",
         lambda e: resume_damaged(e, flip_state_byte),
         says=r"model\.safetensors is damaged.*delete that folder to resume from an older"),
    Case("teacher-flipped-byte", "distill from a teacher folder with a flipped byte",
         lambda e: train_with(e, 'distill.modality="both"',
                              f"distill.teacher={json.dumps(damaged_teacher(e))}"),
         says=r"open_clip_model\.safetensors is damaged: its SHA-256"),
    Case("detector-flipped-byte", "model.detr_checkpoint with a flipped byte",
         lambda e: train_with(e, f"model.detr_checkpoint={json.dumps(damaged_detector(e))}"),
         says=r"detr\.safetensors is damaged: its SHA-256"),
    Case("recipe-cp-below-a-file", "recipe cp to a path below an existing file",
         lambda e: ["recipe", "cp", "tiny", a_file(e) + "/tiny.toml"],
         says=r"DEST .*notes\.txt is a file, not a folder", then=file_intact),
    Case("resume-recipe-toml-deleted", "recipe.toml deleted, --resume with another lr",
         lambda e: resume_damaged(e, lambda run: (run / "recipe.toml").unlink(), "train.lr=5e-4"),
         says=r"differs from its state/step-\d+/recipe\.toml in train\.lr"),
]
# fmt: on


def _first_line_skipped(env: Env) -> None:
    """Check: res.jsonl marks line 1 (a lone surrogate) with its error, line 2 has a box."""
    first, second = (json.loads(x) for x in (env.tmp / "res.jsonl").read_text().splitlines())
    assert "line 1" in first["error"] and "U+D800" in first["error"] and "box" not in first
    assert second["line"] == 2 and len(second["box"]) == 4


def _batch(env: Env, lines: list) -> str:
    path = env.tmp / "batch.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _trapped_flickr(env: Env) -> list[str]:
    argv = flickr(env, [GOOD_ROW])
    F.evil_exec_pth(env.tmp / "splits" / "flickr" / "flickr_val.pth", env.marker)
    return argv


def _circular(env: Env) -> str:
    recipe_file(env, 'extends = "a.toml"\n', "b.toml")
    return recipe_file(env, 'extends = "b.toml"\n', "a.toml")


def _user_folder(env: Env) -> str:
    folder = env.tmp / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    return str(folder)


def _user_folder_intact(env: Env) -> None:
    assert (env.tmp / "mine" / "thesis.tex").read_text() == "precious"


def _unusual_images_kept(env: Env) -> None:
    from vgdistill.data.image_table import ImageTable
    from vgdistill.data.prepare import load_prepared

    manifest = json.loads((env.tmp / "out" / "prepare.json").read_text())
    assert manifest["counts"]["val"]["kept"] == 5, manifest["counts"]
    rows = load_prepared(env.tmp / "out")["val"]
    sizes = {r["expression"]: (r["width"], r["height"]) for r in rows}
    # split files give no size: the stored pixels, as the reference loader reads them
    assert sizes["tall box"] == (80, 40)
    assert sizes["dot"] == (1, 1)
    images = ImageTable.of(rows)
    for r in rows:
        x1, y1, x2, y2 = r["bbox"]
        assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
        image = images.load_row(r, r["expression"])
        assert image.mode == "RGB" and image.size == (r["width"], r["height"])


# ----------------------------------------------------------------------------- the runner


def _is_crash(result) -> bool:
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    return escaped or result.exit_code == 1 or "Traceback" in result.output


def _params() -> list:
    """The cases, those held up by a reported bug elsewhere marked xfail (not strict)."""
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.known_bug)] if c.known_bug
                     else [])
        for c in CASES
    ]  # fmt: skip


@pytest.mark.parametrize("case", _params())
def test_case(case: Case, tiny_data, tiny_run, tmp_path, caplog, monkeypatch, record_property):
    """Run one row of the table and check its outcome."""
    import sys

    import vgdistill.data.loader as loader

    monkeypatch.setattr(loader, "_warned_truncation", False)  # the warning shows once a process
    monkeypatch.setattr(sys, "path", list(sys.path))  # cases may add a folder; undone after
    env = Env(tmp_path, tiny_data, tiny_run, tiny_run / "last", caplog)
    argv = case.argv(env)
    with caplog.at_level("INFO", logger="vgdistill"):
        result = runner.invoke(app(), argv)
    if _is_crash(result):
        record_property("crash", case.id)
    detail = f"{case.id}: argv={argv}\nexit={result.exit_code}\nstdout={result.stdout[-2000:]}\n"
    detail += f"stderr={result.stderr[-2000:]}\nexception={result.exception!r}"
    shown = (result.stderr.strip() or result.stdout.strip()[:200]).replace("\n", " | ")
    print(f"[{case.id}] exit {result.exit_code}: {shown}")  # see every outcome with -s
    assert "Traceback" not in result.output, detail
    assert result.exit_code == case.code, detail
    if case.code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, detail
        assert lines[0].startswith("error: "), detail
        assert re.search(case.says, lines[0]), f"{detail}\nexpected /{case.says}/"
    elif case.says:
        assert re.search(case.says, result.stdout), detail
    if case.then is not None:
        case.then(env, result)


def app():
    """The Typer app (imported late so collecting this file stays cheap)."""
    from vgdistill.cli.app import app as the_app

    return the_app


def test_table_is_big_enough():
    """The issue asks for at least 30 cases across images, phrases, boxes, recipes,
    checkpoints and datasets."""
    areas = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 30
    assert {"image", "phrase", "box", "recipe", "ckpt", "pickle", "data"} <= areas
