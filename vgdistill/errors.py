"""User-facing errors: one line, exit code 2, never a traceback."""

from __future__ import annotations


class VGError(Exception):
    """A problem with the user's input that they can fix; the CLI prints it as one line."""

    exit_code = 2


class NonFiniteLossError(VGError):
    """Training produced a NaN or infinite loss."""
