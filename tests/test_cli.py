"""The command line: `speechssl --help` lists every command and each command's help shows examples."""
import subprocess
import sys

import pytest

from speechssl.cli.main import COMMANDS, build_parser


def test_every_command_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = sorted(set(COMMANDS) - set(sub.choices))
    assert not missing, f"commands without a module: {missing}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_has_examples(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: speechssl " + name in out
    assert "xample" in out, f"`speechssl {name} --help` shows no examples"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "speechssl.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
