"""Losses: grounding (L1 + GIoU), cross-modal distillation, and the grid detector."""
