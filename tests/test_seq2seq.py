"""attnlab seq2seq: tasks from a seed, the framings, incremental decoding ≡ teacher forcing for every
model, padding, a tiny run of every model (results.json's shape, the report), and refused input."""

import argparse
import datetime
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from attnlab.cli import build_parser, main
from attnlab.errors import ConfigError
from attnlab.seq2seq import MODELS, TASKS, Seq2SeqConfig, get_task, run_seq2seq
from attnlab.seq2seq.batches import ExampleBatches, draw
from attnlab.seq2seq.models import BOS, EOS, RNNSeq2Seq, alignment, build, frame_decoder_only, frame_encdec, greedy
from attnlab.seq2seq.tasks import HELD_OUT_EVERY, SEP, _dates_by_length, is_held_out

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(rnn_embed=8, rnn_hidden=12, d_model=16, n_head=2, n_layer=1)


@pytest.mark.parametrize("name", TASKS)
def test_tasks_are_deterministic_per_seed_exact_in_length_and_split_by_hash(name):
    task = get_task(name)
    lengths = [task.min_length + 2, 9, 14]
    a = [task.sample(random.Random(5), n, held_out=False) for n in lengths]
    assert a == [task.sample(random.Random(5), n, held_out=False) for n in lengths]
    assert draw(task, random.Random(1), lengths * 20, held_out=True) != draw(task, random.Random(2), lengths * 20,
                                                                          held_out=True)
    for held_out in (False, True):
        for source, target in (task.sample(random.Random(i), 9, held_out=held_out) for i in range(30)):
            assert len(source) == 9 and is_held_out(source) == held_out
            assert task.decode(task.encode(source)) == source and set(source + target) <= set(task.symbols)
            if name == "reverse":
                assert target == source[::-1]
            elif name == "sort":
                assert target == "".join(sorted(source))
            elif name == "copy":
                assert target == source
            else:
                day = datetime.date.fromisoformat(target)
                assert str(day.year % 100).zfill(2) in source and str(day.day) in source


def test_held_out_share_and_the_date_lengths():
    rng = random.Random(0)
    sources = ["".join(rng.choice("0123456789") for _ in range(8)) for _ in range(5000)]
    assert abs(sum(map(is_held_out, sources)) / 5000 - 1 / HELD_OUT_EVERY) < 0.02
    table = _dates_by_length()
    assert (min(table), max(table)) == (TASKS["dates"].min_length, TASKS["dates"].max_length)
    with pytest.raises(ConfigError, match="length=40"):
        TASKS["dates"].sample(random.Random(0), 40, held_out=False)


def test_the_decoder_only_framing_masks_the_prompt_out_of_the_loss():
    examples = [([5, 6, 7], [7, 6, 5]), ([8, 9], [9, 8])]
    ids, targets = frame_decoder_only(examples)
    assert ids[0].tolist() == [5, 6, 7, SEP, 7, 6, 5]
    assert targets[0].tolist() == [-1, -1, -1, 7, 6, 5, EOS]  # from <sep> on: the output, then its end
    assert targets[1].tolist() == [-1, -1, 9, 8, EOS, -1, -1]  # padding is ignored too
    model = build("decoder-only", 12, max_length=4, **SIZES)
    logits, loss = model(ids, targets)
    kept = targets != -1
    expected = F.cross_entropy(logits[kept], targets[kept])  # only the output positions
    torch.testing.assert_close(loss, expected)
    other_prompt = ids.clone()
    other_prompt[0, :2] = 10  # a different prompt changes the loss only through what it conditions
    assert not torch.allclose(model(other_prompt, targets)[1], loss)
    src, tgt_in, tgt_out = frame_encdec(examples)
    assert tgt_in[1].tolist() == [BOS, 9, 8, 0] and tgt_out[1].tolist() == [9, 8, EOS, -1]


@pytest.mark.parametrize("name", MODELS)
def test_incremental_decoding_equals_the_teacher_forced_forward(name):
    torch.manual_seed(0)
    model = build(name, 14, max_length=6, **SIZES).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # sharper, less uniform logits than the init
    same_length = name == "decoder-only"  # it decodes unpadded batches of one input length
    examples = [([4, 5, 6, 7], [7, 6, 5, 4]), ([8, 9, 10, 11] if same_length else [8, 9], [9, 8, 12, 13])]
    batch = model.frame(examples)
    logits, _ = model(*batch)
    src = batch[0] if name != "decoder-only" else torch.tensor([s for s, _ in examples])
    state = model.start(src, 6)
    fed = torch.tensor([[BOS] + t for _, t in examples])  # (B, 5)
    steps = torch.cat([model.step(state, fed[:, t:t + 1]) for t in range(5)], dim=1)  # (B, 5, V)
    forced = logits if name != "decoder-only" else logits[:, 4:]  # the GPT's output positions start at <sep>
    torch.testing.assert_close(steps, forced, atol=1e-5, rtol=1e-5)
    outputs = greedy(model, src, 4)
    assert all(len(o) <= 5 and (EOS not in o or o.index(EOS) == len(o) - 1) for o in outputs)


@pytest.mark.parametrize("attention", [False, True])
def test_padding_never_changes_an_rnn_models_outputs(attention):
    torch.manual_seed(0)
    model = RNNSeq2Seq(14, 8, 12, attention=attention).eval()
    src, tgt_in, _ = frame_encdec([([4, 5, 6, 7, 8, 9], [9, 8]), ([5, 6], [6, 5])])
    padded, _ = model(src, tgt_in)
    alone, _ = model(src[1:, :2], tgt_in[1:, :3])
    torch.testing.assert_close(padded[1:, :3], alone, atol=1e-6, rtol=1e-6)
    if attention:
        weights = alignment(model, src[1:], [6, 5])[0]  # (1, Tt, Ts): rows are distributions over the input
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, 3))


def test_batches_are_the_same_for_every_model_and_resume_exactly():
    task = get_task("reverse")
    a = ExampleBatches(task, frame_encdec, batch_size=4, max_length=6, seed=3, val_examples=8)
    b = ExampleBatches(task, frame_decoder_only, batch_size=4, max_length=6, seed=3, val_examples=8)
    first = a.next()
    ids, targets = b.next()
    assert a.tokens_per_batch == b.tokens_per_batch == int((first[2] != -1).sum())
    assert [row[row != -1].tolist() for row in first[2]] == [row[row != -1].tolist() for row in targets]
    state = a.state_dict()
    nxt = a.next()
    a.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(a.next(), nxt))
    held = {task.decode(row[row != 0].tolist()) for batch in a.eval_batches(0) for row in batch[0]}
    assert held and all(is_held_out(s) for s in held)


TINY = dict(steps=4, batch_size=8, max_train_length=5, eval_lengths=(3, 5, 7), eval_examples=6, warmup_steps=1,
            threads=1, **SIZES)


def test_a_tiny_run_of_every_model_writes_a_well_formed_report(tmp_path):
    out = tmp_path / "s2s"
    events = []
    summary = run_seq2seq(out, TINY, command="attnlab seq2seq --steps 4", progress=events.append)
    assert [e["model"] for e in events if e["event"] == "done"] == list(MODELS)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"task", "max_train_length", "models", "command", "machine", "date"}
    assert results["task"] == "reverse" and results["max_train_length"] == 5
    assert results["command"] == "attnlab seq2seq --steps 4" and results["machine"]["cores"] >= 1
    assert list(results["models"]) == list(MODELS)
    for name, model in results["models"].items():
        assert set(model) == {"params", "accuracy_by_length", "token_accuracy_by_length"}
        assert model["params"] == summary["results"][name]["params"] > 0
        for key in ("accuracy_by_length", "token_accuracy_by_length"):
            assert list(model[key]) == ["3", "5", "7"] and all(0 <= v <= 1 for v in model[key].values())
    md = (out / "report.md").read_text()
    for section in ("## What was seen", "## Exact match by input length", "## Where the decoder looks", "## Training",
                    "## The paper", "## Run"):
        assert section in md
    assert "| 3 | 5 | 7* |" in md and "attnlab seq2seq --steps 4" in md and "RNNsearch-50 26.75" in md
    page = (out / "report.html").read_text()
    assert not re.search(r"https?:|<script|<link|@import|url\(", page, re.I)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 2
    for png in ("accuracy_by_length.png", "alignment.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_refused_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    cases = [(["--task", "translate"], "invalid choice: 'translate'"),
             (["--models", "rnn-attn,lstm"], "unknown: lstm"),
             (["--lr", "nan"], "lr=nan is not allowed"),
             (["--steps", "-3"], "steps=-3 is not allowed"),
             (["--max-train-length", "40", "--task", "dates"], "max_train_length=40 is not allowed"),
             (["--eval-lengths", "4,0"], "eval_lengths=0 is not allowed")]
    for flags, message in cases:
        out = tmp_path / "new"
        code = None
        try:
            code = main(["seq2seq", "--out", str(out), "--quiet", *flags])
        except SystemExit as exit_:  # argparse refuses a bad choice itself
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not out.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["seq2seq", "--out", str(tmp_path / "taken"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="d_model=30 is not divisible"):
        Seq2SeqConfig(d_model=30, n_head=4)
    assert Seq2SeqConfig().eval_lengths == (4, 8, 12, 16, 20, 24, 28)
    assert Seq2SeqConfig(task="dates", max_train_length=20).eval_lengths == (8, 12, 16, 20, 24, 28)
    assert math.isfinite(Seq2SeqConfig().lr)


def test_every_numeric_seq2seq_flag_refuses_nan_inf_and_negatives(tmp_path, capsys):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = [(a.option_strings[0], a.type) for a in sub.choices["seq2seq"]._actions if a.type in (int, float)]
    assert {"--lr", "--steps", "--seed", "--threads", "--max-train-length"} <= {f for f, _ in flags}
    for flag, kind in flags:
        for value in ["-1"] + (["nan", "inf", "-inf"] if kind is float else []):
            out = tmp_path / "s2s"
            assert main(["seq2seq", "--out", str(out), "--quiet", f"{flag}={value}"]) == 2, (flag, value)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and flag.lstrip("-").replace("-", "_") in err, err
            assert not out.exists()
