"""vgdistill: visual grounding (TransVG) with cross-modal CLIP distillation (EpmVG)."""

__version__ = "0.1.0"
