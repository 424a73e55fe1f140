"""Ablations: plan variants of a recipe, train and evaluate each in its own process, summarise.

A variant is the recipe plus a few `--set` changes to the distillation factors the paper
ablates (position, loss, modality, teacher frozen/trainable, alpha, beta). Every (variant,
seed) is an ordinary run folder under the ablation folder, trained by `vgdistill train` and
scored by `vgdistill eval` in child processes, so a crash or an out-of-memory kill in one
variant loses nothing else. A run whose eval.json exists is finished and skipped on a re-run;
one that was cut off is continued with `train --resume`.

`plan` decides the variants and their run folders, `runner` runs the children, `summary`
turns the eval.json files into summary.csv / .json / .md. No module here imports torch: the
parent process only plans, waits and summarises.
"""
