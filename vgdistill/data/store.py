"""Write a prepared folder's tables straight into the files `datasets.load_from_disk` reads.

One pass with bounded memory: rows are encoded a small batch at a time and streamed into arrow
shards of at most SHARD_BYTES, so nothing is written twice (no generator cache copied by
`save_to_disk`) and no table is held whole. The layout is `DatasetDict.save_to_disk`'s:
`dataset_dict.json` naming the tables, and per table its `data-NNNNN-of-NNNNN.arrow` shards
(arrow IPC streams carrying the features), `dataset_info.json` and `state.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

# datasets' own default shard size for save_to_disk.
SHARD_BYTES = 500 << 20
# A batch is written when it holds this many rows or bytes of images, whichever comes first.
BATCH_ROWS = 1000
BATCH_BYTES = 16 << 20


class TableWriter:
    """One table of a DatasetDict folder, written row by row (`write`), finished by `close`.

    Rows come in the features' storage form (what `Features.encode_example` returns: an image
    as {"bytes", "path"}, a sequence of dicts as a dict of lists), so arrow takes them as is.
    """

    def __init__(self, folder: Path, name: str, features: datasets.Features, fingerprint: str):
        self.dir = folder / name
        self.dir.mkdir(parents=True)
        self.name = name
        self.features = features
        self.fingerprint = fingerprint
        self.rows = 0
        self._schema = features.arrow_schema
        self._batch: list[dict[str, Any]] = []
        self._batch_bytes = 0
        self._shards: list[Path] = []
        self._stream: pa.ipc.RecordBatchStreamWriter | None = None
        self._sink: pa.OSFile | None = None

    def write(self, row: dict[str, Any], nbytes: int = 0) -> None:
        """Add one row (`nbytes`: the size of any large value in it, e.g. image bytes)."""
        self._batch.append(row)
        self._batch_bytes += nbytes
        self.rows += 1
        if len(self._batch) >= BATCH_ROWS or self._batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._batch:
            return
        if self._sink is not None and self._sink.tell() >= SHARD_BYTES:
            self._end_shard()
        if self._sink is None:
            path = self.dir / f".shard-{len(self._shards):05d}.arrow"
            self._shards.append(path)
            self._sink = pa.OSFile(str(path), "wb")
            self._stream = pa.ipc.new_stream(self._sink, self._schema)
        columns = {k: [row[k] for row in self._batch] for k in self.features}
        table = pa.Table.from_pydict(columns, schema=self._schema)
        assert self._stream is not None
        self._stream.write_table(table)
        self._batch, self._batch_bytes = [], 0

    def _end_shard(self) -> None:
        assert self._stream is not None and self._sink is not None
        self._stream.close()
        self._sink.close()
        self._stream = self._sink = None

    def close(self) -> None:
        """Write what is left, name the shards and write the table's info and state files."""
        self._flush()
        if self._sink is not None:
            self._end_shard()
        if not self._shards:  # an empty table still has one (empty) shard, as datasets writes
            import pyarrow as pa

            path = self.dir / ".shard-00000.arrow"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, self._schema):
                pass
            self._shards.append(path)
        names = []
        for i, path in enumerate(self._shards):
            names.append(f"data-{i:05d}-of-{len(self._shards):05d}.arrow")
            os.replace(path, self.dir / names[-1])
        info = {"citation": "", "description": "", "homepage": "", "license": ""}
        info["features"] = self.features.to_dict()
        _write_json(self.dir / "dataset_info.json", info)
        state = {
            "_data_files": [{"filename": n} for n in names],
            "_fingerprint": f"{self.fingerprint}-{self.name}",
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": self.name,
        }
        _write_json(self.dir / "state.json", state)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_dataset_dict(folder: Path, tables: list[str]) -> None:
    """The DatasetDict's index of its tables (written once every table is closed)."""
    _write_json(folder / "dataset_dict.json", {"splits": tables})


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative POSIX path -> size in bytes), for the manifest."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return dict(sorted(sizes.items()))
