"""vgdistill: visual grounding (TransVG) with cross-modal CLIP distillation (EpmVG).

`from vgdistill import Grounder` is the Python API (see `vgdistill.tools.grounder`); it is
imported on first use, so `import vgdistill` (and `vgdistill --help`) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vgdistill.tools.grounder import Grounder

__version__ = "0.1.0"
__all__ = ["Grounder", "__version__"]


def __getattr__(name: str) -> Any:
    """Import `Grounder` when it is first asked for."""
    if name == "Grounder":
        from vgdistill.tools.grounder import Grounder

        return Grounder
    raise AttributeError(f"module 'vgdistill' has no attribute {name!r}")
