"""Shared, session-scoped assets of the robustness suite (built once; the suite stays fast).

- `tiny_data` (tests/conftest.py): the tiny shapes dataset every suite shares;
- `tiny_run`: a run folder trained for 2 steps from recipes/tiny.toml, distillation off;
- `tiny_ckpt`: its last/ checkpoint folder.

Also counts, for the terminal summary, how many robustness cases ran, passed and crashed
(a crash = an exit code 1 "internal error", an exception that escaped a command, or a
traceback shown for bad input).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny.toml"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tiny_sets, tmp_path_factory) -> Path:
    """A run folder (best/, last/, state/) trained for 2 steps, distillation off."""
    from vgdistill.recipe import load_recipe
    from vgdistill.training.student import train

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("robust-run") / "run"
    train(load_recipe(RECIPE, tiny_sets(tiny_data)), out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run) -> Path:
    """The run's last/ checkpoint folder."""
    return tiny_run / "last"


@pytest.fixture(scope="session")
def predictor(tiny_ckpt):
    """The tiny checkpoint loaded once through the Grounder API, on the CPU."""
    from vgdistill import Grounder

    return Grounder.from_pretrained(tiny_ckpt, "cpu")


@pytest.fixture(autouse=True)
def _no_stray_transvg(monkeypatch):
    """No test may find a `transvg` module already imported (the pickle traps rely on it)."""
    import sys

    monkeypatch.delitem(sys.modules, "transvg", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps nothing we assert on


# ------------------------------------------------------------------------ the tally


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    """One line: robustness cases tried / passing / crashes."""
    here = str(HERE.relative_to(ROOT)) + os.sep
    reports = [
        r
        for key in ("passed", "failed", "error", "xfailed", "xpassed")
        for r in terminalreporter.stats.get(key, [])
        if getattr(r, "when", "call") == "call" and r.nodeid.startswith(here)
    ]
    if not reports:
        return
    passed = sum(1 for r in reports if r.outcome == "passed" and not hasattr(r, "wasxfail"))
    crashes = sum(1 for r in reports if any(k == "crash" for k, _ in r.user_properties))
    known = sum(1 for r in reports if hasattr(r, "wasxfail"))
    terminalreporter.write_line(
        f"robustness: {len(reports)} cases tried, {passed} passing, {crashes} crashes"
        + (f" ({known} held up by a known bug elsewhere, marked xfail)" if known else "")
    )
