"""The CLI's contract for mistakes: one line on stderr, exit code 2, no traceback."""

import dataclasses
import json
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


def test_train_flags_read_like_their_config_fields(monkeypatch, capsys):
    from attnlab.compare import CompareConfig
    from attnlab.models.gpt import GPTConfig
    from attnlab.trainer import TrainConfig

    for cls in (GPTConfig, TrainConfig, CompareConfig):  # every field says what it means: its flag's help
        assert all(len(f.metadata.get("help", "")) > 5 for f in dataclasses.fields(cls)), cls
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "__" not in out  # no argparse dest names such as MODEL__BLOCK_SIZE
    for shown in ["--n-layer N ", "--lr X ", "--device TEXT ", "--attention {mha,gqa,mqa,mla,wrapper}",
                  "--tokenizer {char,bpe}", "transformer blocks (default: 4)", "K/V heads; default: n_head for mha"]:
        assert shown in out
    args = cli.build_parser().parse_args(["train", "--n-layer", "2", "--lr", "0.01", "--norm", "rmsnorm"])
    assert (args.model__n_layer, args.train__lr, args.model__norm) == (2, 0.01, "rmsnorm")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--attention", "bogus"])
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_the_module_entry_exits_with_mains_code_and_all_of_its_output():
    """run() leaves with os._exit after main(): the code is main's and the piped output is whole."""
    ok = subprocess.run([sys.executable, "-m", "attnlab", "env", "--format", "json", "--device", "cpu"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["choices"]["device"] == "cpu"
    bad = subprocess.run([sys.executable, "-m", "attnlab", "generate", "--model", "smollm2", "--prompt", "x",
                          "--speculate"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and "speculate" in bad.stderr, bad.stderr


def test_the_quick_exit_waits_for_a_thread_that_is_still_working(tmp_path):
    script = (
        "import pathlib, sys, threading, time\n"
        "from attnlab import cli\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    pathlib.Path(sys.argv[1]).write_text('done')\n"
        "def main():\n"
        "    threading.Thread(target=late).start()\n"
        "    return 3\n"
        "cli.main = main\n"
        "cli.run()\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "late.txt")], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "late.txt").read_text() == "done"
