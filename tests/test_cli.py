"""The CLI's contract for mistakes: one line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from attnlab import cli
from attnlab.errors import ConfigError


def test_unknown_command_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "no-such-command" in err


def test_user_error_from_library_is_one_line_exit_2(monkeypatch, capsys):
    def boom(args):
        raise ConfigError("num_heads=3 is not allowed:\nexpected a divisor of d_out=8")

    parser = cli.build_parser()
    args = parser.parse_args(["explain"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, boom))
    assert cli.main(["explain"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "num_heads=3 is not allowed: expected a divisor of d_out=8" in err


class _Fixed:
    def __init__(self, parser, args, func):
        self.args = args
        self.args.func = func

    def parse_args(self, argv):
        return self.args


def test_bug_is_not_hidden(monkeypatch):
    def bug(args):
        raise RuntimeError("internal")

    parser = cli.build_parser()
    args = parser.parse_args(["explain"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, bug))
    with pytest.raises(RuntimeError):
        cli.main(["explain"])


def test_console_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "attnlab", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("attnlab ")
