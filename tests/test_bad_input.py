"""The bad-input battery: every numeric flag of train, compare, generate, context, roles, ablate and
convert refuses nan, inf and out-of-range values with exit 2 and one line (no traceback), before anything is
written; and a run killed before its first checkpoint can be continued with --resume."""

import argparse

import pytest
import torch

from attnlab import cli
from attnlab.data.tokenizer import CharTokenizer
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.train import train
from attnlab.trainer import CHECKPOINT, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# Flags where a negative number is a real choice, so only nan/inf are refused (none today: a new
# one must be listed here on purpose).
NEGATIVE_ALLOWED: set[str] = set()
TINY_TRAIN = ["--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "16", "--batch-size", "2",
              "--max-steps", "1", "--eval-iters", "1", "--threads", "1"]


def numeric_flags(command: str) -> list[tuple[str, type]]:
    """(--flag, int or float) of every option of ``attnlab COMMAND`` that takes a number."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(action.option_strings[0], action.type) for action in sub.choices[command]._actions
            if action.type in (int, float) and action.option_strings]


def bad_values(flag: str, kind: type) -> list[str]:
    values = ["-1"] if flag not in NEGATIVE_ALLOWED else []
    return values + (["nan", "inf", "-inf"] if kind is float else [])


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be that is the question\n" * 40)
    return str(path)


@pytest.fixture
def gpt_folder(tmp_path):
    tokenizer = CharTokenizer.from_text("abc ")
    GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, block_size=16)).save_pretrained(
        tmp_path / "gpt", tokenizer)
    return str(tmp_path / "gpt")


def refused(argv, capsys, flag: str) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert flag.lstrip("-").replace("-", "_") in err or "invalid" in err, err
    return err


def test_every_numeric_train_flag_refuses_nan_inf_and_negatives_without_a_trace(corpus, tmp_path, capsys):
    flags = numeric_flags("train")
    assert {"--lr", "--max-time", "--rope-theta", "--dropout", "--beta1", "--target-val-loss"} <= {f for f, _ in flags}
    for flag, kind in flags:
        for value in bad_values(flag, kind):
            out = tmp_path / "run"
            refused(["train", "--out", str(out), "--corpus", corpus, *TINY_TRAIN, f"{flag}={value}"], capsys, flag)
            assert not out.exists(), (flag, value, sorted(p.name for p in out.rglob("*")))


def test_every_numeric_compare_flag_refuses_nan_inf_and_negatives(corpus, tmp_path, capsys):
    flags = numeric_flags("compare")
    assert {"--lr", "--temperature", "--seed", "--threads"} <= {f for f, _ in flags}
    for flag, kind in flags:
        for value in bad_values(flag, kind):
            out = tmp_path / "cmp"
            refused(["compare", "--out", str(out), "--corpus", corpus, "--quiet", f"{flag}={value}"], capsys, flag)
            assert not out.exists(), (flag, value)


def test_every_numeric_generate_flag_refuses_nan_inf_and_negatives(gpt_folder, capsys):
    flags = numeric_flags("generate")
    assert {"--temperature", "--top-p", "--max-new-tokens"} <= {f for f, _ in flags}
    for flag, kind in flags:
        if flag in ("--seed", "--top-k"):  # any seed is a seed; --top-k 0 turns top-k off (-1 is refused below)
            continue
        for value in bad_values(flag, kind):
            refused(["generate", gpt_folder, "--prompt", "ab", "--max-new-tokens", "2", f"{flag}={value}"], capsys, flag)
    refused(["generate", gpt_folder, "--prompt", "ab", "--top-k", "-1"], capsys, "top_k")


def test_every_numeric_context_and_roles_flag_refuses_nan_inf_and_negatives(gpt_folder, tmp_path, capsys):
    commands = {"context": ["context", "a cab", "the cab", "--word", "cab"], "roles": ["roles", "--seq-len", "4"]}
    assert {f for f, _ in numeric_flags("roles")} == {"--seq-len", "--repeats", "--batch", "--seed", "--threshold"}
    assert {f for f, _ in numeric_flags("context")} == {"--top"}
    for command, argv in commands.items():
        for flag, kind in numeric_flags(command):
            for value in bad_values(flag, kind) + (["0"] if flag != "--seed" else []):
                out = tmp_path / command
                refused([*argv, "--model", gpt_folder, "--out", str(out), f"{flag}={value}"], capsys, flag)
                assert not out.exists(), (command, flag, value)


def test_every_numeric_convert_flag_refuses_nan_inf_and_negatives(tmp_path, capsys):
    source = tmp_path / "rope-gpt"
    GPT(GPTConfig(vocab_size=5, n_layer=1, n_head=2, d_model=16, block_size=16, positions="rope")).save_pretrained(
        source, CharTokenizer.from_text("abc "))
    flags = numeric_flags("convert")
    assert {"--kv-rank", "--rope-dims", "--kv-heads", "--heal-steps"} <= {f for f, _ in flags}
    for flag, kind in flags:
        for value in bad_values(flag, kind):
            for mode in ([], ["--sweep"]) if flag == "--heal-steps" else ([],):
                out = tmp_path / "converted"
                refused(["convert", str(source), "--out", str(out), *mode, f"{flag}={value}"], capsys, flag)
                assert not out.exists(), (flag, value)


def test_a_refused_model_config_leaves_no_folder(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    err = refused(["train", "--out", str(out), "--corpus", corpus, "--d-model", "30", "--n-head", "4"], capsys, "d_model")
    assert "divisible" in err and not out.exists()
    refused(["train", "--out", str(out), "--corpus", corpus, "--lr", "nan"], capsys, "lr")
    assert not out.exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(corpus, tmp_path, capsys):
    settings = dict(corpus=corpus, batch_size=2, max_steps=4, eval_interval=2, eval_iters=1, log_interval=1,
                    threads=1, dtype="float32")
    model = dict(n_layer=1, n_head=2, d_model=16, block_size=16)
    train(tmp_path / "whole", model=model, config=settings)

    def killed(event):  # dies at its first logged step, before any checkpoint
        if event["event"] == "step":
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(out, model=model, config=settings, progress=killed)
    assert not (out / CHECKPOINT).exists() and (out / "train_config.json").is_file()
    assert cli.main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "holds no checkpoint yet" in lines[0] and "step 0" in lines[0]
    assert [r["train_loss"] for r in read_metrics(out)] == [r["train_loss"] for r in read_metrics(tmp_path / "whole")]
    assert torch.equal(GPT.from_pretrained(out).wte.weight, GPT.from_pretrained(tmp_path / "whole").wte.weight)


def test_every_numeric_ablate_flag_refuses_nan_inf_and_negatives(gpt_folder, corpus, tmp_path, capsys):
    flags = numeric_flags("ablate")
    assert {"--max-tokens", "--window", "--seed"} <= {f for f, _ in flags}
    for flag, kind in flags:
        for value in bad_values(flag, kind):
            out = tmp_path / "ablate"
            refused(["ablate", "--model", gpt_folder, "--text", corpus, "--out", str(out), "--quiet",
                     f"{flag}={value}"], capsys, flag)
            assert not out.exists(), (flag, value)
    refused(["ablate", "--model", gpt_folder, "--text", corpus, "--out", str(tmp_path / "a"), "--window", "0"],
            capsys, "window")
