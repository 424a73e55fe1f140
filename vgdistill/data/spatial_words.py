"""Spatial words in phrases: which phrases name a position, and the left/right swap of a flip."""

from __future__ import annotations

import re

_SPATIAL = re.compile(r"\b(left|right|top|bottom|middle)(most)?\b", re.IGNORECASE)
# Only the three usual spellings are swapped, so the swap is its own inverse; "most" suffixes
# ("leftmost") follow the stem. \b keeps "bright", "lefty" and "copyright" untouched.
_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)(most|MOST)?\b")
_SWAP = {
    "left": "right",
    "right": "left",
    "Left": "Right",
    "Right": "Left",
    "LEFT": "RIGHT",
    "RIGHT": "LEFT",
}


def swap_left_right(phrase: str) -> str:
    """Swap the whole words left and right (any of lower/Title/UPPER case, '-most' kept)."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(1)] + (m.group(2) or ""), phrase)


def has_spatial_word(phrase: str) -> bool:
    """True when the phrase names a position (left/right/top/bottom/middle) as a whole word."""
    return _SPATIAL.search(phrase) is not None
