"""Attention over generated tokens (`attnlab viz --generate N`): the rows recorded while decoding with
the KV cache equal the rows of one uncached forward over the whole text, every generated token's row
covers every earlier token, and the page carries them with the prompt length."""

import json
import re

import pytest
import torch

from attnlab import cli
from attnlab.attention.record import record_attention
from attnlab.data.tokenizer import CharTokenizer
from attnlab.generate import generate, generation_attention
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.viz import AttentionView

TEXT = "the artist painted the portrait of a woman with a brush"
TOKENIZER = CharTokenizer.from_text(TEXT)
CONFIGS = {
    "gqa-rope": dict(attention="gqa", n_kv_head=2, positions="rope"),
    "mla-absorbed": dict(attention="mla", mla_mode="absorbed", kv_lora_rank=16, qk_nope_head_dim=8,
                         qk_rope_head_dim=4, v_head_dim=8),
    "mla-naive-moe": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                          ffn="moe", n_routed_experts=4, n_activated_experts=2),
    "lecture-wrapper": dict(attention="wrapper"),
}


def gpt(fields) -> GPT:
    model = GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=24, n_layer=2, n_head=4, d_model=32, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)  # far from uniform attention
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_rows_equal_one_uncached_forward(name):
    model = gpt(CONFIGS[name])
    prompt = torch.tensor([TOKENIZER.encode(TEXT[:6])])
    ids, weights = generation_attention(model, prompt, 9)
    assert torch.equal(ids, generate(model, prompt, 9, temperature=0))
    with record_attention(model) as rec:
        model(ids)
    assert len(weights) == len(rec.weights) == 2
    for got, expected in zip(weights, rec.weights):
        assert got.shape == expected.shape == (1, 4, 15, 15)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        last = got[0, :, -1]  # (heads, T): the last generated token's row
        torch.testing.assert_close(last.sum(-1), torch.ones(4))
        assert (last > 0).all()  # it attends over every earlier token
    assert all(not m._recording for m in model.modules() if hasattr(m, "_recording"))  # fused again afterwards


def test_the_whole_text_must_fit_one_context():
    with pytest.raises(ValueError, match="exceeds the context of 24"):
        generation_attention(gpt(CONFIGS["gqa-rope"]), torch.tensor([TOKENIZER.encode(TEXT[:20])]), 5)


def _embedded(page: str) -> dict:
    return json.loads(re.search(r'id="attnlab-data">(.*?)</script>', page, re.S).group(1))


def test_viz_generate_writes_the_growing_page(tmp_path, capsys):
    gpt(CONFIGS["gqa-rope"]).save_pretrained(tmp_path / "ckpt", tokenizer=TOKENIZER)
    out = tmp_path / "pics"
    assert cli.main(["viz", "the artist", "--model", str(tmp_path / "ckpt"), "--generate", "6", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("16 tokens (10 prompt + 6 generated), 2 layers × 4 heads")
    data = _embedded((out / "attention.html").read_text())
    assert data["prompt_length"] == 10 and len(data["tokens"]) == 16
    for layer in data["weights"]:
        for head in layer:
            last = head[-1]
            assert abs(sum(last) - 1) < 1e-4 and all(w > 0 for w in last)  # over every earlier token
            assert all(abs(sum(row) - 1) < 1e-4 for row in head)


def test_viz_generate_refusals_write_nothing(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "pics"
    assert cli.main(["viz", "the artist", "--model", tiny_checkpoint, "--generate", "3", "--out", str(out)]) == 2
    assert "not a decoder: attention over generated tokens needs a GPT" in capsys.readouterr().err
    assert cli.main(["viz", "the artist", "--generate", "-1", "--out", str(out)]) == 2
    assert "--generate=-1 is not allowed" in capsys.readouterr().err
    assert not out.exists()


def test_prompt_length_is_checked():
    weights = [torch.softmax(torch.randn(1, 2, 3, 3), -1)]
    with pytest.raises(ValueError, match=r"prompt_length=4 is not allowed: expected an integer in 1..3"):
        AttentionView(["a", "b", "c"], weights, prompt_length=4)
