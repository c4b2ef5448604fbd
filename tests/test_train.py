"""Trainer: run folder and metrics, exact resume (in process and after SIGKILL), accumulation,
bf16, schedule, nanoGPT-style eval, and the errors that protect a user's files."""

import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from attnlab.cli import main
from attnlab.errors import ConfigError
from attnlab.models.gpt import GPT
from attnlab.data.batches import WindowBatches, sample_windows
from attnlab import optim as optim_module
from attnlab.optim import Muon, WarmupCosine, make_optimizer, muon_parameters
from attnlab.train import train
from attnlab.device import choose_precision
from attnlab.trainer import CHECKPOINT, Trainer, TrainConfig, read_metrics

MODEL = dict(n_layer=1, n_head=2, d_model=32, block_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = "the king and queen of england shall speak to thee my lord good night sweet prince".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(800)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(corpus, **kw):
    return {**dict(corpus=str(corpus), batch_size=4, max_steps=12, eval_interval=6, eval_iters=2, log_interval=1,
                   warmup_steps=2, decay_steps=12, threads=1, dtype="float32"), **kw}


def losses(out):
    return {row["step"]: row["train_loss"] for row in read_metrics(out)}


def test_run_folder_metrics_and_loadable_model(corpus, tmp_path):
    out = tmp_path / "run"
    summary = train(out, model=MODEL, config=config(corpus, log_interval=3))
    assert summary["step"] == 12 and summary["stopped"] == "max_steps"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", CHECKPOINT,
                                               "metrics.jsonl", "train_config.json", "data"}
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert {"step", "elapsed_s", "train_loss", "val_loss", "tokens_per_s", "lr"} <= set(rows[0])
    assert rows[0]["val_loss"] is None and rows[1]["val_loss"] is not None
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(b["elapsed_s"] > a["elapsed_s"] > 0 for a, b in zip(rows, rows[1:]))
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    model = GPT.from_pretrained(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())


def test_max_time_budget_and_progress_events(corpus, tmp_path):
    events = []
    summary = train(tmp_path / "run", model=MODEL, config=config(corpus, max_time=1e-3), progress=events.append)
    assert summary["stopped"] == "max_time" and summary["step"] == 1  # this process is older than 1 ms
    assert [e["event"] for e in events] == ["start", "eval", "end"]
    assert events[1]["eta_s"] == 0.0 and events[1]["train_loss"] > 0
    # The budget ended between evals: the final weights are still scored, and the summary says so.
    assert events[1]["val_loss"] is not None and summary["val_loss"] == events[1]["val_loss"]
    assert read_metrics(tmp_path / "run")[-1]["val_loss"] == summary["val_loss"]


def test_tensorboard_events_when_installed(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    train(tmp_path / "run", model=MODEL, config=config(corpus, max_steps=2))
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_evals_start_at_eval_start_and_always_end_the_run(corpus, tmp_path):
    train(tmp_path / "run", model=MODEL, config=config(corpus, max_steps=9, eval_interval=2, eval_start=6))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["val_loss"] is not None] == [6, 8, 9]


def test_resume_continues_exactly_in_process(corpus, tmp_path):
    train(tmp_path / "full", model=MODEL, config=config(corpus))
    train(tmp_path / "split", model=MODEL, config=config(corpus, max_steps=5))
    train(tmp_path / "split", config={"max_steps": 12}, resume=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_at_any_moment_then_resume_gives_the_same_losses(corpus, tmp_path, optimizer):
    steps = 30
    train(tmp_path / "full", model=MODEL, config=config(corpus, max_steps=steps, decay_steps=steps, optimizer=optimizer))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "attnlab", "train", "--out", str(out), "--quiet", "--corpus", str(corpus),
           "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--block-size", "16", "--batch-size", "4",
           "--max-steps", str(steps), "--eval-interval", "6", "--eval-iters", "2", "--log-interval", "1",
           "--warmup-steps", "2", "--decay-steps", str(steps), "--threads", "1", "--ckpt-interval", "3",
           "--dtype", "float32", "--optimizer", optimizer]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after = random.Random().randint(4, 24)  # a different moment every run
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= kill_after:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = subprocess.run([*cmd[:5], str(out), "--resume", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert losses(out) == losses(tmp_path / "full")


def test_grad_accumulation_matches_the_whole_batch(corpus, tmp_path):
    train(tmp_path / "whole", model=MODEL, config=config(corpus, max_steps=4, batch_size=8))
    train(tmp_path / "accum", model=MODEL, config=config(corpus, max_steps=4, batch_size=4, grad_accum=2))
    whole, accum = losses(tmp_path / "whole"), losses(tmp_path / "accum")
    for step in whole:
        assert accum[step] == pytest.approx(whole[step], abs=1e-5)


def test_bf16_autocast_and_moe_stats(corpus, tmp_path):
    moe = dict(MODEL, ffn="moe", n_routed_experts=4, n_activated_experts=2, attention="gqa", n_kv_head=1,
               positions="rope")
    summary = train(tmp_path / "bf16", model=moe, config=config(corpus, max_steps=3, dtype="bfloat16"))
    assert summary["precision"] == "bfloat16" and summary["attention_kernel"] in ("fused", "explicit")
    row = read_metrics(tmp_path / "bf16")[-1]
    assert math.isfinite(row["train_loss"]) and 0 < row["train_loss"] < 10
    assert row["moe_load_imbalance"] >= 1.0 and "moe_router_entropy" in row and row["moe_aux_loss"] > 0


def test_warmup_then_cosine_to_the_floor():
    schedule = WarmupCosine(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    values = [schedule(s) for s in range(130)]
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
    assert max(values) == values[10] == 1.0
    assert all(a >= b for a, b in zip(values[10:110], values[11:111]))
    assert values[60] == pytest.approx(0.55) and values[110:] == [0.1] * 20


def test_the_eval_is_mean_cross_entropy_over_every_window_position():
    torch.manual_seed(0)
    model = GPT.from_config(dict(vocab_size=11, **MODEL))
    data = torch.randint(0, 11, (500,))
    batches = WindowBatches(data, data, batch_size=2, block_size=8, seed=3, eval_iters=3, eval_batch_size=5)
    trainer = Trainer(model, TrainConfig(), batches, device=torch.device("cpu"), precision=choose_precision("float32"))
    trainer.step = 7
    loss = trainer.evaluate()
    g = torch.Generator().manual_seed(3 * 1_000_003 + 7)
    windows = [sample_windows(data, 5, 8, g) for _ in range(3)]
    x, y = torch.cat([w[0] for w in windows]), torch.cat([w[1] for w in windows])
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x)[0].reshape(-1, 11), y.reshape(-1))
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_existing_out_needs_overwrite_and_is_left_untouched(corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    args = ["train", "--out", str(out), "--corpus", str(corpus), "--max-steps", "2", "--quiet", "--threads", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([*args, "--overwrite", "--n-layer", "1", "--d-model", "32", "--block-size", "16"]) == 0
    assert (out / "notes.txt").read_text() == "precious" and (out / CHECKPOINT).exists()


def test_corrupt_or_mismatched_checkpoints_are_refused_and_kept(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train(out, model=MODEL, config=config(corpus, max_steps=3))
    with pytest.raises(ConfigError, match="does not match.*attention: checkpoint has 'mha', requested 'mqa'"):
        train(out, model={"attention": "mqa"}, resume=True)
    with pytest.raises(ConfigError, match="lr: checkpoint has 0.001, requested 0.5"):
        train(out, config={"lr": 0.5}, resume=True)
    data = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 2])
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert (out / CHECKPOINT).read_bytes() == data[: len(data) // 2]
    torch.save({"weights": torch.zeros(2)}, out / CHECKPOINT)
    with pytest.raises(ConfigError, match="not an attnlab training checkpoint"):
        train(out, resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tmp_path / "empty", resume=True)


def test_bad_training_settings_name_the_argument(corpus, tmp_path):
    with pytest.raises(ConfigError, match="lr=0"):
        train(tmp_path / "a", config=config(corpus, lr=0))
    with pytest.raises(ConfigError, match="eval_block_size=64 is larger than the model's block_size=16"):
        train(tmp_path / "b", model=MODEL, config=config(corpus, eval_block_size=64))
    with pytest.raises(ConfigError, match="unknown TrainConfig fields \\['learning_rate'\\]"):
        train(tmp_path / "c", config={"learning_rate": 1.0})
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = GPT.from_config(dict(vocab_size=11, n_layer=2, n_head=2, d_model=16, block_size=8, attention="mla",
                                 kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, ffn="moe",
                                 n_routed_experts=4, n_shared_experts=1, positions="learned", norm="rmsnorm"))
    muon, adamw = muon_parameters(model)
    assert set(muon) | set(adamw) == {n for n, _ in model.named_parameters()} and not set(muon) & set(adamw)
    assert set(muon) == {n for n, p in model.named_parameters()
                         if p.dim() == 2 and n.startswith("blocks.") and ".gate." not in n}
    assert "blocks.0.attn.wkv_b.weight" in muon and "blocks.1.ffn.shared_experts.w2.weight" in muon
    assert {"wte.weight", "wpe.weight", "blocks.0.ffn.gate.weight", "blocks.0.ffn.experts.w1",
            "blocks.0.attn.kv_norm.weight", "norm_f.weight"} <= set(adamw)
    optim = make_optimizer(model, lr=1e-3, kind="muon")
    assert isinstance(optim.optimizers["muon"], Muon)
    assert sum(len(g["params"]) for g in optim.optimizers["muon"].param_groups) == len(muon)
    assert sum(len(g["params"]) for g in optim.optimizers["adamw"].param_groups) == len(adamw)


def test_adamw_lr_sets_the_rate_of_what_adamw_trains_under_muon_and_both_follow_one_schedule():
    model = GPT.from_config(dict(vocab_size=11, n_layer=1, n_head=2, d_model=16, block_size=8, norm="rmsnorm"))
    optim = make_optimizer(model, lr=1e-3, adamw_lr=6e-3, kind="muon", warmup_steps=2, decay_steps=6, min_ratio=0.1)
    peaks = {"muon": 1e-3, "adamw": 6e-3}
    for step in range(8):
        expected = WarmupCosine(2, 6, 0.1)(step)
        for name, opt in optim.optimizers.items():
            assert all(g["lr"] == pytest.approx(peaks[name] * expected) for g in opt.param_groups), (name, step)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optim.step()
    plain = make_optimizer(model, lr=1e-3, kind="muon")
    assert all(g["lr"] == 1e-3 for opt in plain.optimizers.values() for g in opt.param_groups)  # default: lr
    with pytest.raises(ConfigError, match="adamw_lr"):
        TrainConfig(adamw_lr=0.0)


def test_muon_trains(corpus, tmp_path):
    summary = train(tmp_path / "run", model=MODEL, config=config(corpus, optimizer="muon", lr=5e-3))
    rows = read_metrics(tmp_path / "run")
    assert summary["step"] == 12 and rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2


@pytest.mark.parametrize("nesterov, adjust", [(True, "match_rms_adamw"), (False, None)])
def test_our_muon_is_torchs_muon_with_newton_schulz_in_a_chosen_dtype(nesterov, adjust):
    torch.manual_seed(0)
    weights = [torch.randn(12, 5, requires_grad=True), torch.randn(4, 9, requires_grad=True)]
    copies = [[w.detach().clone().requires_grad_() for w in weights] for _ in range(2)]
    theirs = torch.optim.Muon(weights, lr=0.02, nesterov=nesterov, adjust_lr_fn=adjust)
    ours_bf16 = Muon(copies[0], lr=0.02, nesterov=nesterov, adjust_lr_fn=adjust, ns_dtype=torch.bfloat16)
    ours_fp32 = Muon(copies[1], lr=0.02, nesterov=nesterov, adjust_lr_fn=adjust, ns_dtype=torch.float32)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((weights, theirs), (copies[0], ours_bf16), (copies[1], ours_fp32)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for w, a, b in zip(weights, *copies):
        assert torch.equal(w, a)  # the same steps as PyTorch's, op for op, when run in bf16
        torch.testing.assert_close(w, b, atol=5e-3, rtol=0)  # fp32 Newton-Schulz: bf16's rounding apart


@pytest.mark.parametrize("adjust, calls", [("match_rms_adamw", [(4, 6, 10)]), (None, [(3, 6, 10), (6, 10)])])
def test_muon_orthogonalises_same_shape_matrices_in_one_batch_as_it_would_one_by_one(monkeypatch, adjust, calls):
    """Weights of one shape up to a transpose (and one LR scale) go through Newton-Schulz as one
    (G, m, n) stack, tall ones turned wide: each update equals the one computed for that matrix alone
    (fp32; batched and single matmuls may differ in the last bits). Keller's scale √max(1, rows/cols)
    differs between 6×10 and 10×6, so under it the tall one goes alone."""
    torch.manual_seed(1)
    weights = [torch.randn(6, 10, requires_grad=True) for _ in range(3)] + [torch.randn(10, 6, requires_grad=True)]
    alone = [[w.detach().clone().requires_grad_()] for w in weights]
    kwargs = dict(lr=0.05, ns_dtype=torch.float32, weight_decay=0.1, adjust_lr_fn=adjust)
    together = Muon(weights, **kwargs)
    singles = [Muon(params, **kwargs) for params in alone]
    batched = []
    real = optim_module.newton_schulz
    monkeypatch.setattr(optim_module, "newton_schulz", lambda g, *a: batched.append(tuple(g.shape)) or real(g, *a))
    for _ in range(3):
        batched.clear()
        grads = [torch.randn_like(w) for w in weights]
        for w, (a,), g in zip(weights, alone, grads):
            w.grad, a.grad = g.clone(), g.clone()
        together.step()
        assert batched == calls
        for opt in singles:
            opt.step()
    for w, (a,) in zip(weights, alone):
        torch.testing.assert_close(w, a, atol=1e-6, rtol=1e-5)
