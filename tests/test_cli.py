"""The `fastmae` command: every subcommand imports and builds its parser, the console script is installed."""

import shutil
import subprocess
import sys

import pytest

from fastmae.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(name.split() + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: fastmae " + name in capsys.readouterr().out


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'pretrian'" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("fastmae")
    assert exe is not None, "the fastmae console command is not on PATH: reinstall with pip install -e ."
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "pretrain" in out and "profile" in out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastmae", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout
