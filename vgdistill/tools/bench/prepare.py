"""`python -m vgdistill.tools.bench.prepare`: what `vgdistill prepare` costs on RefCOCO-like data.

Generates a refer-layout dataset (`instances.json` + `refs(unc).p`, split by image 80/10/5/5
into train/val/testA/testB) of photo-like 640x480 JPEGs with 7 expressions per image, then
prepares the first N images of it for each size N and worker count, every prepare in a fresh
process. Per run: the input images' bytes, the prepared folder's bytes and their ratio, the
peak disk the build took (output folder and anything beside it, polled) against the final
folder, rows/s, and the peak RSS of the prepare process and of its worker processes.

    python -m vgdistill.tools.bench.prepare --images 500,2000,6000 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 640, 480
# Sensor noise that makes a 640x480 JPEG about as large as a COCO photo of that size.
NOISE = 15.5
SPLITS = ("train",) * 16 + ("val",) * 2 + ("testA", "testB")
SENTENCES = (4, 3)  # two referred objects per image: 7 expressions
POLL_S = 0.02
# The measured process: prepare alone, as the CLI runs it (this module's package imports
# torch, which prepare does not), printing its figures as one JSON line. Peak RSS is VmHWM,
# the high-water mark of the process since its exec (ru_maxrss would count the parent's
# pages the fork copied).
CHILD = """
import json, sys
from pathlib import Path
from vgdistill.data.prepare import prepare
from vgdistill.data.sources import SourceArgs
root, images, out, workers = sys.argv[1:]
args = SourceArgs(root=Path(root), images=Path(images))
result = prepare("refcoco", args, out, workers=int(workers), progress=False)
print(json.dumps({
    "rows": result.rows_kept,
    "images": result.manifest["images"],
    "seconds": result.seconds,
    "rows_per_s": result.rows_read / result.seconds,
    "rss_mb": [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    / 1024,
}))
"""


def generate_images(folder: Path, n: int, seed: int = 0) -> None:
    """`n` photo-like JPEGs named as COCO train2014 names them (existing ones are kept)."""
    import numpy as np

    from vgdistill.tools.bench.synthetic import _jpeg

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"COCO_train2014_{i:012d}.jpg"
        if not path.exists():
            rng = np.random.default_rng([seed, i])
            path.write_bytes(_jpeg(rng, WIDTH, HEIGHT, noise=NOISE))


def write_refer(root: Path, n: int) -> None:
    """The refer layout's annotations for images 0..n-1: two objects per image, 4 + 3 phrases."""
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    images, anns, refs = [], [], []
    for i in range(n):
        images.append({"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg"})
        images[-1].update(width=WIDTH, height=HEIGHT)
        for k, n_sents in enumerate(SENTENCES):
            ann_id = 2 * i + k
            box = [40.0 + 300 * k, 60.0 + (i % 7) * 10, 200.0, 180.0]
            anns.append({"id": ann_id, "image_id": i, "bbox": box, "category_id": 1})
            side = ("left", "right")[k]
            sents = [f"the {side} thing number {j} of image {i}" for j in range(n_sents)]
            refs.append(
                {
                    "ref_id": ann_id,
                    "ann_id": ann_id,
                    "image_id": i,
                    "split": SPLITS[i % len(SPLITS)],
                    "sentences": [{"sent": s, "raw": s, "tokens": s.split()} for s in sents],
                }
            )
    instances = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))


def disk_bytes(paths: list[Path]) -> tuple[int, int]:
    """(allocated, apparent) bytes of every file under `paths` (missing ones count 0)."""
    allocated = apparent = 0
    for top in paths:
        for root, _, files in os.walk(top) if top.is_dir() else [(top.parent, [], [top.name])]:
            for name in files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except OSError:  # written or removed meanwhile
                    continue
                allocated += st.st_blocks * 512
                apparent += st.st_size
    return allocated, apparent


def _beside(out: Path) -> list[Path]:
    """The output folder and everything prepare puts beside it (its build folder, lock)."""
    return [
        p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")
    ]


def _children(pid: int) -> list[int]:
    """The prepare workers among the child processes of `pid`, from /proc (a process forked
    but not yet turned into a worker still reads as its parent, and is left out)."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids = [int(v) for v in path.read_text().split()]
            found += [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        except OSError:  # the process ended meanwhile
            continue
    return found


def _hwm_kib(pid: int) -> int:
    """The peak RSS (VmHWM, KiB) of a live process; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_prepare(root: Path, images: Path, out: Path, workers: int) -> dict[str, Any]:
    """One first build in a fresh process, its disk polled meanwhile; the figures of the run."""
    cmd = [sys.executable, "-c", CHILD, str(root), str(images), str(out), str(workers)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0]
    workers_hwm: dict[int, int] = {}  # worker pid -> its peak RSS (KiB) seen so far
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], disk_bytes(_beside(out))[0])
            for pid in _children(child.pid):
                workers_hwm[pid] = max(workers_hwm.get(pid, 0), _hwm_kib(pid))
            time.sleep(POLL_S)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, _ = child.communicate()
    stop.set()
    watcher.join()
    if child.returncode != 0:
        raise SystemExit(f"prepare failed (exit {child.returncode}): {stdout}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    final_alloc, final_bytes = disk_bytes([out])
    # The last poll may come before the final rename: the finished folder is a sample too.
    peak_disk = max(peak[0], final_alloc)
    figures.update(peak_disk=peak_disk, final_disk=final_alloc, final_bytes=final_bytes)
    figures["worker_rss_mb"] = max(workers_hwm.values(), default=0) / 1024
    return figures


def bench(sizes: list[int], workers: list[int], work: Path) -> list[dict[str, Any]]:
    """Every (size, workers) run's figures, printed as they come."""
    images = work / "train2014"
    print(f"generating {max(sizes)} JPEGs of {WIDTH}x{HEIGHT} in {images} ...", flush=True)
    generate_images(images, max(sizes))
    results = []
    for n in sizes:
        root = work / f"refer-{n}"
        write_refer(root, n)
        files = sorted(images.iterdir())[:n]
        input_bytes = sum(p.stat().st_size for p in files)
        for w in workers:
            out = work / f"prepared-{n}-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            figures = run_prepare(root, images, out, w)
            figures.update(n_images=n, workers=w, input_bytes=input_bytes)
            figures["ratio"] = figures["final_bytes"] / input_bytes
            figures["peak_over_final"] = figures["peak_disk"] / figures["final_disk"]
            results.append(figures)
            print(format_row(figures), flush=True)
            shutil.rmtree(out)
    return results


HEADER = (
    f"{'images':>6} {'rows':>6} {'workers':>7} {'input MB':>9} {'prepared MB':>11} {'ratio':>6} "
    f"{'peak/final disk':>15} {'rows/s':>7} {'RSS MB':>7} {'worker RSS MB':>13}"
)


def format_row(f: dict[str, Any]) -> str:
    """One run as a line under HEADER."""
    worker = f"{f['worker_rss_mb']:.0f}" if f["workers"] > 1 else "-"
    return (
        f"{f['n_images']:>6} {f['rows']:>6} {f['workers']:>7} {f['input_bytes'] / 1e6:>9.1f} "
        f"{f['final_bytes'] / 1e6:>11.1f} {f['ratio']:>6.3f} {f['peak_over_final']:>15.3f} "
        f"{f['rows_per_s']:>7.0f} {f['rss_mb']:>7.0f} {worker:>13}"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="500,2000,6000", help="dataset sizes, in images")
    parser.add_argument("--workers", default="1,2", help="prepare --workers values to compare")
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    opts = parser.parse_args(argv)
    sizes = [int(v) for v in opts.images.split(",")]
    workers = [int(v) for v in opts.workers.split(",")]
    work = opts.dir or Path(tempfile.mkdtemp(prefix="vgdistill-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; each prepare runs in a fresh process (first build)")
    print(HEADER, flush=True)
    try:
        results = bench(sizes, workers, work)
    finally:
        if opts.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    by = {(r["n_images"], r["workers"]): r for r in results}
    for n in sizes:
        if (n, 1) in by and (n, 2) in by:
            speedup = by[n, 2]["rows_per_s"] / by[n, 1]["rows_per_s"]
            print(f"{n} images: rows/s with --workers 2 / --workers 1 = {speedup:.2f}")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
