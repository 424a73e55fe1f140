"""Allow `python -m vgdistill` (used by `accelerate launch -m vgdistill ...`)."""

from vgdistill.cli.app import main

main()
