"""What users moving scripts from the reference code (facebookresearch/mae) rely on: its flags, its
log.txt, its launches."""

import pytest

from fastmae.cli import main


# ---- argument errors name the subcommand ----

@pytest.mark.parametrize("argv, prog", [
    (["linprobe", "--data_path", "d", "--no_such_flag", "1"], "fastmae linprobe"),
    (["finetune", "--data_path", "d", "--no_such_flag"], "fastmae finetune"),
    (["pretrain", "--no_such_flag"], "fastmae pretrain"),
    (["bench", "step", "--no_such_flag"], "fastmae bench step"),
])
def test_an_unknown_flag_is_reported_with_the_subcommands_usage(argv, prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {prog} [-h]"), err
    assert f"{prog}: error: unrecognized arguments: --no_such_flag" in err
    assert "Traceback" not in err
