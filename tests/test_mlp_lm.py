import math

import pytest
import torch

from attnlab.data import CharTokenizer
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models import load_pretrained, load_tokenizer_from
from attnlab.models.mlp import MLPLM, MLPConfig


def test_each_position_sees_exactly_its_previous_context_tokens():
    model = MLPLM(vocab_size=11, context=3, d_embed=4, hidden=8).eval()
    idx = torch.randint(0, 11, (2, 9))
    logits, loss = model(idx)
    assert logits.shape == (2, 9, 11) and loss is None
    for t in range(9):
        window = idx[:, max(0, t - 2): t + 1]  # a short window at the start reads padding instead
        alone, _ = model(window)
        torch.testing.assert_close(logits[:, t], alone[:, -1], rtol=0, atol=1e-6)


def test_overfits_a_tiny_text(one_thread):
    text = "to be, or not to be, that is the question: "
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor([tok.encode(text * 4)])
    x, y = ids[:, :-1], ids[:, 1:]
    model = MLPLM(tok.vocab_size, context=4, d_embed=16, hidden=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, start = model(x, y)
    assert start.item() == pytest.approx(math.log(tok.vocab_size), abs=0.05)  # small init: uniform guess
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start.item()


def test_save_load_gives_identical_logits(tmp_path):
    tok = CharTokenizer("abcdefg")
    model = MLPLM(tok.vocab_size, context=2, d_embed=5, hidden=6, dropout=0.1)
    model.save_pretrained(tmp_path / "mlp", tokenizer=tok)
    loaded = load_pretrained(tmp_path / "mlp")
    assert isinstance(loaded, MLPLM) and loaded.config == model.config and not loaded.training
    idx = torch.randint(0, 7, (3, 10))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])
    assert load_tokenizer_from(tmp_path / "mlp").encode("gab") == [6, 0, 1]
    assert MLPLM.from_config(MLPConfig(7, context=2, d_embed=5, hidden=6)).num_params() == model.num_params()


def test_loss_ignores_minus_one_targets():
    model = MLPLM(5, context=2, d_embed=3, hidden=4)
    idx, targets = torch.randint(0, 5, (2, 6)), torch.randint(0, 5, (2, 6))
    logits, _ = model(idx)
    masked = targets.clone()
    masked[:, 3:] = -1
    expected = torch.nn.functional.cross_entropy(logits[:, :3].reshape(-1, 5), targets[:, :3].reshape(-1))
    torch.testing.assert_close(model(idx, masked)[1], expected)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="context=0"):
        MLPLM(10, context=0)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        MLPLM(10, dropout=1.5)
    model = MLPLM(10)
    with pytest.raises(InputTypeError, match="int64"):
        model(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match=r"expected ids in \[0, 10\)"):
        model(torch.tensor([[1, 10]]))
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        MLPLM.from_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="corrupt"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "mlp", "vocab_size": 10, "heads": 2}')
    with pytest.raises(ConfigError, match=r"unknown fields \['heads'\]"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "transformerxl"}')
    with pytest.raises(ConfigError, match="model_type='transformerxl'"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not JSON"):
        load_pretrained(tmp_path / "m")
