"""`metrics.jsonl`: one JSON object per line, appended by the main process of a run.

Lines are {"type": "train", "step", "epoch", "loss", <loss parts>, "lr", "images_per_s"} and
{"type": "eval", "epoch", "step", "split", "acc50", "acc75", "miou", "count"}. A resumed run
first drops the lines written after the step it resumes from, so the file never holds two
versions of the same step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from vgdistill.atomic import write_text

# The metrics log of every folder a stage trains into: a run folder, a detector, a teacher.
METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only writer for a run's metrics.jsonl (a no-op when `enabled` is False)."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk (a kill loses at most this line)."""
        if not self.enabled:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop records whose step is beyond `step` (work redone after a resume)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (a kill mid-write) is skipped."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
