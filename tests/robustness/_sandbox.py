"""Run vgdistill commands on real read-only and size-limited mounts.

The commands run in a private mount namespace (`unshare --user --map-root-user --mount`), so
the tmpfs and read-only bind mounts a test makes are seen by nothing else and vanish when the
commands end; no root rights are needed where the kernel allows user namespaces. Where it
does not, `available()` is False and the tests skip (the injected-ENOSPC and chmod tests in
tests/test_faults_fs.py cover the same code paths).
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .conftest import ROOT

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this machine lets us mount a tmpfs in a private namespace."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        probe = f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(tmp)}"
        try:
            done = subprocess.run([*UNSHARE, "sh", "-c", probe], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0


@dataclass
class Outcome:
    """One command's exit code and output."""

    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        """The non-empty lines of stderr."""
        return [line for line in self.err.splitlines() if line.strip()]


class Sandbox:
    """A shell script of mount steps and named vgdistill commands, run in one namespace."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "sandbox-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.lines = ["set -u"]

    def sh(self, line: str) -> Sandbox:
        """A shell line (mounts, copies); a failing one stops the script."""
        self.lines.append(f"{line} || exit 97")
        return self

    def tmpfs(self, path: Path, size: str) -> Sandbox:
        """Mount a fresh tmpfs of `size` (e.g. "64m") on `path`."""
        path.mkdir(parents=True, exist_ok=True)
        return self.sh(f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(path))}")

    def read_only(self, path: Path) -> Sandbox:
        """Make `path` a read-only view of itself."""
        p = shlex.quote(str(path))
        return self.sh(f"mount --bind {p} {p}").sh(f"mount -o remount,bind,ro {p}")

    def vg(self, name: str, *argv: str) -> Sandbox:
        """Run `vgdistill ARGV`; its outcome is `result(name)` afterwards."""
        log = self.logs / name
        cmd = shlex.join([sys.executable, "-m", "vgdistill", *argv])
        self.lines.append(f"{cmd} >{log}.out 2>{log}.err; echo $? >{log}.code")
        return self

    def run(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the script; raises AssertionError when a mount step failed."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        script = "\n".join(self.lines) + "\n"
        done = subprocess.run(
            [*UNSHARE, "sh", "-c", script],
            cwd=self.tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"sandbox script failed:\n{script}\n{done.stderr[-3000:]}"
        return done

    def result(self, name: str) -> Outcome:
        """The outcome of the command run as `name`."""
        log = self.logs / name
        code, out, err = (Path(f"{log}.{kind}").read_text() for kind in ("code", "out", "err"))
        return Outcome(int(code), out, err)
