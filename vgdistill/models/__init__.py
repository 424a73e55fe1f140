"""Models: backbones, DETR encoder, BERT branch, fusion, teacher and distillation."""
