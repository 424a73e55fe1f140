"""Running an ablation: every (variant, seed) trained and evaluated by a child process."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgdistill.errors import VGError
from vgdistill.tools.ablate.plan import Run, Variant


@dataclass
class RunOutcome:
    """What happened to one run in this call."""

    status: str  # "done" (finished now), "skipped" (finished earlier), "failed"
    seconds: float = 0.0
    error: str | None = None


class Interrupted(Exception):
    """The user stopped the ablation (Ctrl-C or SIGTERM); the running child has stopped."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the ablate process dies (Linux), so an
    orphaned trainer saves a resumable state and stops instead of running on unseen."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Terminated(Exception):
    """This process got SIGTERM."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `_Terminated` while children run (main thread only; else a no-op)."""

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launcher(launch: str | None) -> list[str]:
    """The command each run's `-m vgdistill ...` follows: this Python, or the words of a
    --launch command line such as 'accelerate launch --num_processes 8' (checked now, so a
    typo fails before any run starts)."""
    if launch is None:
        return [sys.executable]
    try:
        words = shlex.split(launch)
    except ValueError as e:
        raise VGError(f"--launch {launch!r}: {e}") from None
    if not words:
        raise VGError("--launch is empty; give a command such as 'accelerate launch'")
    if shutil.which(words[0]) is None:
        raise VGError(f"--launch: {words[0]} is not a command on PATH nor a runnable file")
    return words


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4): this process runs the 2nd of every 4 runs; None -> None (all)."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit()):
        raise VGError(f"--shard takes I/N, e.g. 1/4, got {text!r}")
    i, n = int(index), int(count)
    if not 1 <= i <= n:
        raise VGError(f"--shard {text}: I must be between 1 and N")
    return i, n


def shard_runs(variants: list[Variant], shard: tuple[int, int] | None) -> list[tuple[Variant, Run]]:
    """Every (variant, run) in plan order, or only shard I of N's: runs I, I+N, I+2N, ..."""
    pairs = [(variant, run) for variant in variants for run in variant.runs]
    if shard is None:
        return pairs
    index, count = shard
    return pairs[index - 1 :: count]


def run_child(args: list[str], log: Path, launch: list[str] | None = None) -> int:
    """Run `python -m vgdistill ARGS` (or `LAUNCH -m vgdistill ARGS`) with its output appended
    to `log`; its exit code.

    Ctrl-C reaches the child too (same process group): the trainer saves a resumable state,
    and we wait for it. A SIGTERM to this process is passed on as one stop request.
    """
    cmd = [*(launch or [sys.executable]), "-m", "vgdistill", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": os.environ.get("COLUMNS", "120")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            return proc.wait()
        except (KeyboardInterrupt, _Terminated) as e:
            # Ctrl-C at a terminal reached the child too (same process group); a SIGTERM sent
            # to this process did not: pass that one on. Either way the trainer now saves a
            # resumable state and exits; wait for it.
            if isinstance(e, _Terminated):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait()
            except (KeyboardInterrupt, _Terminated):  # asked twice: stop now
                proc.kill()
                proc.wait()
            raise Interrupted from None


def _last_error(log: Path) -> str:
    """The child's last meaningful line (the one-line error `friendly` prints)."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith("==="):
            return text[:300]
    return ""


def run_one(
    recipe_path: Path,
    overrides: list[str],
    variant: Variant,
    run: Run,
    verbose: bool = False,
    launch: list[str] | None = None,
) -> RunOutcome:
    """Train (resuming whatever is there) and evaluate one run folder in child processes,
    each started by `launch` (default: this Python)."""
    if run.status() == "done":
        return RunOutcome("skipped")
    start = time.monotonic()
    sets = [*overrides, *variant.overrides(run)]
    flags = ["-v"] if verbose else []
    train_args = [*flags, "train", str(recipe_path), "--out", str(run.dir), "--resume"]
    train_args += ["--no-progress"]
    for item in sets:
        train_args += ["--set", item]
    with _sigterm_raises():
        rc = run_child(train_args, run.log, launch)
        if rc != 0:
            return RunOutcome(
                "failed", time.monotonic() - start, f"train exited {rc}: {_last_error(run.log)}"
            )
        eval_args = [*flags, "eval", str(run.dir), "--json", str(run.folder.eval)]
        rc = run_child(eval_args, run.log, launch)
    if rc != 0 or run.results() is None:
        return RunOutcome(
            "failed", time.monotonic() - start, f"eval exited {rc}: {_last_error(run.log)}"
        )
    return RunOutcome("done", time.monotonic() - start)


def run_all(
    recipe_path: Path,
    overrides: list[str],
    variants: list[Variant],
    outcomes: dict[str, RunOutcome],
    on_event: Callable[[str, Variant, Run, RunOutcome | None], None] | None = None,
    verbose: bool = False,
    launch: list[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, RunOutcome]:
    """Run every (variant, seed) in order (or shard I of N's share), filling `outcomes` (keyed
    by run folder) as it goes; each child starts under `launch` (default: this Python).

    A failed run is recorded and the next one starts. `Interrupted` propagates once the
    running child has stopped; `outcomes` then holds every run that ended before it.
    """
    for variant, run in shard_runs(variants, shard):
        if on_event:
            on_event("start", variant, run, None)
        outcome = run_one(recipe_path, overrides, variant, run, verbose, launch)
        outcomes[str(run.dir)] = outcome
        if on_event:
            on_event("end", variant, run, outcome)
    return outcomes
