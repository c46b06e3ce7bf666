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


def test_library_errors_become_one_line(capsys):
    import argparse

    from speechssl.cli.common import exits_on

    @exits_on(ValueError, code=3)
    def run(args):
        if args.fail:
            raise ValueError("config key 'x' must be > 0")
        return 0

    assert run(argparse.Namespace(command="demo", fail=False)) == 0
    assert run(argparse.Namespace(command="demo", fail=True)) == 3
    assert capsys.readouterr().err == "speechssl demo: config key 'x' must be > 0\n"
    with pytest.raises(KeyError):  # anything else is a bug: its traceback stays
        exits_on(ValueError)(lambda args: {}["k"])(argparse.Namespace(command="demo"))


def test_experiment_args_one_helper():
    import argparse

    from speechssl.cli.common import add_experiment_args

    p = argparse.ArgumentParser()
    add_experiment_args(p, several_configs=True, schedule_change=False)
    args = p.parse_args(["--config", "a.yaml", "--config", "b.yaml", "--out", "o", "--set", "k=1", "--resume"])
    assert (args.config, args.out, args.overrides, args.resume) == (["a.yaml", "b.yaml"], "o", ["k=1"], True)
    assert not hasattr(args, "allow_schedule_change")
    parser = build_parser()
    for name in ("pretrain", "distill", "prune"):
        args = parser.parse_args([name, "--config", "c.yaml", "--out", "o", "--resume", "--allow-schedule-change"])
        assert (args.config, args.resume, args.allow_schedule_change, args.overwrite) == ("c.yaml", True, True, False)
