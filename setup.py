"""Package list for setuptools (everything else is in pyproject.toml).

The shipped recipes stay in the top-level recipes/ folder of the checkout, where users and
tests find them; the wheel carries them as the data package `vgdistill.recipes`.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["vgdistill", "vgdistill.*"]), "vgdistill.recipes"],
    package_dir={"vgdistill.recipes": "recipes"},
)
