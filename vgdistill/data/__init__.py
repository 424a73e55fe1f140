"""Datasets: sources, prepare, image decoding, transforms and loaders."""
