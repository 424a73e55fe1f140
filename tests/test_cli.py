"""The command-line surface: help renders, the commands exist, --version works."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vgdistill import __version__
from vgdistill.cli.app import app

runner = CliRunner()
COMMANDS = ["prepare", "train", "eval", "ablate", "predict"]


def test_help_lists_the_five_main_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("argv", [[c, "--help"] for c in COMMANDS] + [["recipe", "show", "--help"]])
def test_every_subcommand_help_renders(argv):
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_does_not_import_torch():
    code = (
        "import sys; from vgdistill.cli.app import app; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
