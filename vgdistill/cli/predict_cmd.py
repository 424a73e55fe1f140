"""`vgdistill predict` (being built)."""

from __future__ import annotations

from vgdistill.cli.common import friendly
from vgdistill.errors import VGError


@friendly
def command() -> None:
    """(being built)"""
    raise VGError("predict is not built yet")
