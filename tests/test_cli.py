"""The `fastmae` command: every subcommand imports and builds its parser, the console script is installed."""

import shutil
import subprocess
import sys

import pytest

from fastmae.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(name.split() + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: fastmae " + name in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_says_what_it_is_and_its_default(name):
    """linprobe --help hid that it runs 90 epochs of batch 512 at blr 0.1; a dozen flags had no line."""
    parser, _ = build_parser(name.split())
    command = parser.command_parsers[name]
    silent = [a.option_strings[0] for a in command._actions if a.option_strings and not a.help]
    assert silent == [], silent
    text = command.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    if name == "linprobe":
        for said in ("(default: 512)", "(default: 90)", "(default: 0.1)"):
            assert said in " ".join(text.split()), said


def test_the_command_groups_say_what_they_hold(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bench speed benchmarks: step (training step" in text and "subcommands" not in text


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


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--output_dir", "{file}"], "--output_dir {file} is a file, not a folder"),
    (["pretrain", "--log_dir", "{file}/runs"], "--log_dir {file}/runs: {file} is a file, so no folder can be made there"),
    (["bench", "step", "--out_dir", "{file}"], "--out_dir {file} is a file, not a folder"),
    (["bench", "table2", "--json", "{folder}"], "--json {folder} is a folder; name the file to write"),
    (["bench", "data", "--plot", "{folder}"], "--plot {folder} is a folder; name the file to write"),
    (["profile", "--model", "mae_vit_micro_patch4", "--json", "{file}/profile.json"], "--json {file}/profile.json: {file} is a file"),
    (["visualize", "--checkpoint", "c.pth", "--images", "x", "--output", "{file}/r.png"], "--output {file}/r.png: {file} is a file"),
])
def test_unwritable_destinations_are_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    file, folder = tmp_path / "a_file", tmp_path / "a_folder"
    file.write_text("results of an earlier run")
    folder.mkdir()

    def must_not_run(args):
        raise AssertionError("the command ran although its destination is unwritable")

    argv = [a.format(file=file, folder=folder) for a in argv]
    module = COMMANDS[" ".join(argv[:2]) if argv[0] == "bench" else argv[0]][0]
    monkeypatch.setattr(f"{module}.run", must_not_run)
    assert main(argv) == 2
    assert message.format(file=file, folder=folder) in capsys.readouterr().err
    assert file.read_text() == "results of an earlier run"
    assert list(folder.iterdir()) == []


def test_bench_step_takes_compile_alone_as_the_other_commands_do():
    for argv, compiled in ((["bench", "step", "--compile"], "on"), (["bench", "step", "--compile", "off"], "off"),
                           (["bench", "step"], "auto")):
        parser, _ = build_parser(argv)
        assert parser.parse_known_args(argv)[0].compile == compiled
