"""Recurrent LMs (Elman RNN, LSTM, GRU): save/load, state decoding ≡ recomputing, the state's constant
size, training by the one Trainer, and `attnlab train --model-type rnn` + `attnlab generate`."""

import pytest
import torch

from attnlab.attention.cache import KVCache
from attnlab.cli import main
from attnlab.errors import ConfigError
from attnlab.generate import generate
from attnlab.models.base import load_pretrained, model_class
from attnlab.models.rnn import CELLS, RecurrentState, RNNConfig, RNNLM
from attnlab.train import MODEL_TYPES, train
from attnlab.trainer import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cell: str, block_size: int = 16, sharpen: float = 1.0) -> RNNLM:
    torch.manual_seed(1)
    model = RNNLM(RNNConfig(vocab_size=20, cell=cell, n_layer=2, d_model=24, block_size=block_size)).eval()
    with torch.no_grad():  # sharper logits, so a greedy argmax is never a near tie
        model.lm_head.weight.mul_(sharpen)
    return model


@pytest.mark.parametrize("cell", CELLS)
def test_save_then_load_gives_the_same_logits(cell, tmp_path):
    model = tiny(cell)
    idx = torch.randint(0, 20, (3, 11))
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, RNNLM) and loaded.config == model.config
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_stepping_the_state_equals_the_full_forward(cell):
    model = tiny(cell)
    idx = torch.randint(0, 20, (2, 12))
    full, _ = model(idx)
    caches = model.new_caches(2, 16)
    steps = [model(idx[:, :5], caches=caches)[0]] + [model(idx[:, t:t + 1], caches=caches)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert caches[0].length == 12


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_generation_with_the_state_equals_recomputing(cell):
    model = tiny(cell, sharpen=20.0)
    prompt = torch.randint(0, 20, (3, 4))
    cached = generate(model, prompt, 20, temperature=0, use_cache=True)  # 24 > block_size 16: cropped as a GPT
    uncached = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (3, 24) and torch.equal(cached, uncached)
    assert len({tuple(row) for row in cached[:, 4:].tolist()}) > 1  # the batch rows differ: a real batch test


def test_the_state_stays_the_same_size_while_a_kv_cache_grows():
    model = tiny("lstm")
    caches = model.new_caches(2, 64)
    kv = KVCache(2, n_kv_heads=2, max_len=64, k_dim=12)
    sizes = []
    for t in (1, 10, 50):
        model(torch.randint(0, 20, (2, t if not sizes else t - caches[0].length)), caches=caches)
        kv.length = caches[0].length
        sizes.append((caches[0].bytes(), kv.bytes()))
    assert [s for s, _ in sizes] == [2 * 2 * 24 * 2 * 4] * 3  # batch · layers · hidden · (h, c) · fp32
    assert [k for _, k in sizes] == [2 * 1 * 48 * 4, 2 * 10 * 48 * 4, 2 * 50 * 48 * 4]
    assert caches[0].bytes_per_token() == 0
    gru = tiny("gru").new_caches(1, 8)[0]
    assert gru.bytes() == 2 * 24 * 4 and gru.c is None  # no cell state


def test_wrong_caches_and_overflow_are_named():
    model = tiny("gru")
    with pytest.raises(ConfigError, match="RecurrentState"):
        model(torch.zeros(1, 3, dtype=torch.long), caches=[KVCache(1, 1, 4, 4)])
    with pytest.raises(ConfigError, match="batch_size=2"):
        model(torch.zeros(1, 3, dtype=torch.long), caches=model.new_caches(2, 8))
    caches = model.new_caches(1, 4)
    with pytest.raises(ConfigError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), caches=caches)
    with pytest.raises(ConfigError, match="cell='transformer'"):
        RNNConfig(cell="transformer")
    with pytest.raises(ConfigError, match="dropout=nan"):
        RNNConfig(dropout=float("nan"))
    assert isinstance(RecurrentState(1, 1, 4, 4, lstm=False).tensors(), torch.Tensor)


@pytest.fixture
def tiny_text(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("to be, or not to be: that is the question.\n" * 60)
    return path


@pytest.mark.parametrize("cell", CELLS)
def test_the_trainer_overfits_a_tiny_text(cell, tiny_text, tmp_path):
    assert "rnn" in MODEL_TYPES and model_class("rnn") is RNNLM
    out = tmp_path / cell
    summary = train(out, model={"model_type": "rnn", "cell": cell, "n_layer": 1, "d_model": 64, "block_size": 32},
                    config=dict(corpus=str(tiny_text), batch_size=16, max_steps=150, lr=1e-2, warmup_steps=10,
                                eval_interval=150, eval_iters=2, log_interval=1, threads=1, dtype="float32"))
    rows = read_metrics(out)
    assert rows[0]["train_loss"] > 1.0  # chance is ln(19) ≈ 2.9
    assert summary["val_loss"] < 0.15, summary  # the text repeats: a memorising model predicts it
    model = load_pretrained(out)
    assert isinstance(model, RNNLM) and model.config.cell == cell


def test_cli_trains_an_rnn_and_generates_from_its_folder(tiny_text, tmp_path, capsys):
    out = tmp_path / "gru"
    args = ["train", "--model-type", "rnn", "--cell", "gru", "--n-layer", "1", "--d-model", "64", "--block-size", "32",
            "--corpus", str(tiny_text), "--batch-size", "16", "--max-steps", "150", "--lr", "0.01",
            "--eval-interval", "150", "--eval-iters", "2", "--threads", "1", "--dtype", "float32", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "to be, or not", "--temperature", "0", "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out.startswith("to be, or not to be: that is the")
    assert main(["train", "--model-type", "rnn", "--attention", "mla", "--corpus", str(tiny_text),
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "unknown RNNConfig fields ['attention']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
