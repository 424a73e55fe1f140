"""Models: backbones, visual and text branches, fusion layers, EpmVG, the CLIP teacher,
checkpoints and the TransVG import."""
