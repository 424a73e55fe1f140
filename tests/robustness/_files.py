"""Writers of bad (and merely unusual) input files for the robustness suite.

Every writer takes the path to write and returns it, so a case can build exactly the file it
needs in its own temp folder.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------ images


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 array with texture (so JPEG bytes are not trivially short)."""
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def rgb_png(path: Path, width: int = 48, height: int = 32) -> Path:
    """A plain RGB PNG."""
    Image.fromarray(noise(width, height)).save(path)
    return path


def rgb_jpeg(path: Path, width: int = 48, height: int = 32) -> Path:
    """A plain RGB JPEG."""
    Image.fromarray(noise(width, height)).save(path, format="JPEG", quality=90)
    return path


def zero_bytes(path: Path) -> Path:
    """An empty file with an image name."""
    path.write_bytes(b"")
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut off half way through its entropy-coded data."""
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def not_an_image(path: Path) -> Path:
    """Text in a file named like an image."""
    path.write_text("this is not an image, just some text\n" * 20)
    return path


def binary_garbage(path: Path) -> Path:
    """Bytes that are not UTF-8 text (a PNG header and noise)."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def grayscale(path: Path) -> Path:
    """An 8-bit grayscale (mode L) PNG, 40x30."""
    arr = np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))
    Image.fromarray(arr, mode="L").save(path)
    return path


def cmyk_jpeg(path: Path) -> Path:
    """A CMYK JPEG, 50x30."""
    Image.fromarray(noise(50, 30)).convert("CMYK").save(path, format="JPEG", quality=90)
    return path


def rgba_png(path: Path) -> Path:
    """An RGBA PNG with a transparent half, 40x40."""
    arr = np.concatenate([noise(40, 40), np.full((40, 40, 1), 255, np.uint8)], axis=2)
    arr[:, :20, 3] = 0
    Image.fromarray(arr, mode="RGBA").save(path)
    return path


def png16(path: Path) -> Path:
    """A 16-bit grayscale PNG (mode I;16) using the whole 0..65535 range, 36x24."""
    arr = (np.linspace(0, 65535, 36 * 24).reshape(24, 36)).astype(np.uint16)
    Image.fromarray(arr).save(path)
    return path


def palette_transparent(path: Path) -> Path:
    """A palette (mode P) PNG with a transparent colour, 30x20."""
    im = Image.fromarray(noise(30, 20)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.save(path, transparency=0)
    return path


def exif_rotated(path: Path) -> Path:
    """A JPEG stored 80x40 with EXIF orientation 6 (rotate 90° CW): upright it is 40x80."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise(80, 40)).save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return path


def one_pixel(path: Path) -> Path:
    """A 1x1 PNG."""
    Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    return path


def png_named_jpg(path: Path) -> Path:
    """PNG bytes in a file ending in .jpg (the extension lies; the content decides)."""
    buf = io.BytesIO()
    Image.fromarray(noise(30, 30)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def decompression_bomb(path: Path) -> Path:
    """A 12 KB PNG that claims 10,000 x 10,000 pixels (100 M, above the 89.5 M limit)."""
    Image.new("1", (10_000, 10_000)).save(path, optimize=False)
    return path


# ------------------------------------------------------------------------------ pickles


class _Exec:
    """Pickles to `exec(code)`: what a booby-trapped checkpoint carries."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (exec, (self.code,))


def marker_code(marker: Path) -> str:
    """Python that proves it ran: import transvg (as the trap says) and write `marker`."""
    return (
        "import sys\n"
        "try:\n    import transvg  # noqa\nexcept ImportError:\n    pass\n"
        f"open({str(marker)!r}, 'w').write('code from a pickle ran')\n"
    )


def evil_exec_pth(path: Path, marker: Path) -> Path:
    """A torch .pth whose pickle runs `import transvg` + writes `marker` when unpickled."""
    import torch

    state = {
        "model": {"vl_transformer.layer.weight": torch.zeros(2, 2)},
        "args": _Exec(marker_code(marker)),
    }
    torch.save(state, path)
    return path


def other_model_pth(path: Path) -> Path:
    """A harmless .pth holding another model's state dict (a small classifier)."""
    import torch

    torch.save({"model": {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}}, path)
    return path


def fake_transvg_package(folder: Path, marker: Path) -> Path:
    """A folder holding a `transvg` package whose import writes `marker` (put it on sys.path)."""
    pkg = folder / "transvg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('transvg was imported by an unpickler')\n"
        "class Args:\n    pass\n"
    )
    return folder


def evil_global_pth(path: Path) -> Path:
    """A torch .pth naming the global `transvg.Args`: an unsafe unpickler would import transvg.

    The class is faked in sys.modules only while saving, so writing the file imports nothing.
    """
    import torch

    module = types.ModuleType("transvg")

    class Args:
        pass

    Args.__module__ = "transvg"
    Args.__qualname__ = "Args"
    module.Args = Args  # type: ignore[attr-defined]
    saved = sys.modules.get("transvg")
    sys.modules["transvg"] = module
    try:
        torch.save({"model": {"w": torch.zeros(1)}, "args": Args()}, path)
    finally:
        if saved is None:
            sys.modules.pop("transvg", None)
        else:
            sys.modules["transvg"] = saved
    return path


def evil_plain_pickle(path: Path, marker: Path) -> Path:
    """A plain pickle (a refer `refs(unc).p`) that runs code when loaded."""
    path.write_bytes(pickle.dumps([{"ref_id": 1, "trap": _Exec(marker_code(marker))}], protocol=2))
    return path


def split_file(path: Path, items: list) -> Path:
    """A TransVG split file: a list of tuples saved with torch.save."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(items, path)
    return path
