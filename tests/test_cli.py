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


def _commands():
    """(argv prefix, callback) of every command, sub-apps included."""
    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        subs = getattr(cmd, "commands", None)
        if subs:
            yield from (([name, sub], c.callback) for sub, c in subs.items())
        else:
            yield [name], cmd.callback


def test_help_reflows_each_docstring_paragraph_to_the_terminal():
    """A docstring's hard line breaks are not kept: a paragraph runs on to the width."""
    checked = 0
    for argv, callback in _commands():
        out = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "250"}).output
        lines = [" ".join(line.split()) for line in out.splitlines()]
        for para in (callback.__doc__ or "").split("\n\n"):
            words = para.replace("`", "").split()
            if len(para.strip().splitlines()) < 2 or len(" ".join(words)) > 200:
                continue  # one-line paragraphs prove nothing; long ones wrap anyway
            assert any(" ".join(words) in line for line in lines), (argv, para)
            checked += 1
    assert checked >= 5
