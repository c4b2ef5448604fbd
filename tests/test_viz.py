"""PNG heatmaps and the self-contained HTML page: shapes, escaping, no network, errors."""

import json
import re

import numpy as np
import pytest
import torch

from attnlab import ConfigError, InputTypeError, MultiHeadAttention, record_attention
from attnlab.viz import AttentionView, attention_stack, head_view, model_view, plot_grid, plot_head, save_png

TOKENS = ["the", "artist", "<script>alert(1)</script>", 'say "hi"', "a & b", "</script><b>x"]


def _weights(n_layers=2, n_heads=3, seq=len(TOKENS)):
    return [torch.softmax(torch.randn(1, n_heads, seq, seq), dim=-1) for _ in range(n_layers)]


def _embedded(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="attnlab-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


def test_stack_of_recorded_weights():
    mha = MultiHeadAttention(8, 8, context_length=16, dropout=0.0, num_heads=2)
    x = torch.randn(1, len(TOKENS), 8)
    with record_attention(mha) as rec:
        mha(x)
    stack = attention_stack(TOKENS, rec.weights)
    assert stack.shape == (1, 2, len(TOKENS), len(TOKENS))
    np.testing.assert_allclose(stack[0], rec.weights[0][0].numpy())


def test_stack_errors():
    with pytest.raises(ConfigError, match="tokens"):
        attention_stack([], _weights())
    with pytest.raises(InputTypeError, match="tokens"):
        attention_stack("the artist", _weights())
    with pytest.raises(InputTypeError, match="weights"):
        attention_stack(TOKENS, torch.rand(1, 2, 6, 6))
    with pytest.raises(ConfigError, match=r"weights\[0\] has shape \(1, 3, 5, 5\)"):
        attention_stack(TOKENS, _weights(seq=5))
    with pytest.raises(ConfigError, match="same number of heads"):
        attention_stack(TOKENS, [_weights(1, 3)[0], _weights(1, 2)[0]])


def test_pngs_written_and_not_overwritten(tmp_path):
    weights = _weights()
    grid = save_png(plot_grid(TOKENS, weights), tmp_path / "grid.png")
    head = save_png(plot_head(TOKENS, weights, layer=1, head=2), tmp_path / "head.png")
    for path in (grid, head):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = grid.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        save_png(plot_head(TOKENS, weights, 0, 0), grid)
    assert grid.read_bytes() == before
    with pytest.raises(ConfigError, match="layer=2"):
        plot_head(TOKENS, weights, layer=2, head=0)
    with pytest.raises(ConfigError, match="head=3"):
        plot_head(TOKENS, weights, layer=0, head=3)


def test_page_is_self_contained_and_round_trips_the_data():
    weights = _weights()
    page = AttentionView(TOKENS, weights, title="t").to_html()
    assert "http" not in page and "src=" not in page and "href=" not in page and "@import" not in page
    data = _embedded(page)
    assert data["tokens"] == TOKENS
    got = np.array(data["weights"])
    assert got.shape == (2, 3, len(TOKENS), len(TOKENS))
    np.testing.assert_allclose(got, np.stack([w[0].numpy() for w in weights]), atol=1e-5)
    assert "{{" not in page


def test_page_escapes_tokens_and_title():
    page = AttentionView(TOKENS, _weights(), title="</title><script>alert(2)</script>").to_html()
    # The only <script> tags are the page's own two; no token or title can open or close one.
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "alert(1)" in page and "<script>alert(1)" not in page
    assert "<title>&lt;/title&gt;&lt;script&gt;alert(2)&lt;/script&gt;</title>" in page
    # Tokens are drawn with textContent only.
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_views_and_jupyter_repr(tmp_path):
    weights = _weights()
    assert _embedded(head_view(TOKENS, weights, layer=1, heads=[2]).to_html())["heads"] == [2]
    assert _embedded(model_view(TOKENS, weights).to_html())["view"] == "model"
    view = AttentionView(TOKENS, weights)
    frame = view._repr_html_()
    assert frame.startswith("<iframe srcdoc=\"") and "<script" not in frame
    path = view.save(tmp_path / "a.html")
    assert path.read_text(encoding="utf-8") == view.to_html()
    with pytest.raises(ConfigError, match="already exists"):
        view.save(path)
    with pytest.raises(ConfigError, match="view='table'"):
        AttentionView(TOKENS, weights, view="table")
    with pytest.raises(ConfigError, match="heads="):
        AttentionView(TOKENS, weights, heads=[0, 3])
    with pytest.raises(ConfigError, match="layer=-1"):
        AttentionView(TOKENS, weights, layer=-1)


def test_cli_viz_writes_every_file_and_never_overwrites(tiny_checkpoint, tmp_path, capsys):
    from attnlab.cli import main

    out = tmp_path / "pics"
    text = "The artist painted <b>a</b> & more"
    assert main(["viz", text, "--model", tiny_checkpoint, "--out", str(out), "--layer", "1", "--head", "3"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention.html", "attention_grid.png", "layer1_head3.png"]
    data = _embedded((out / "attention.html").read_text(encoding="utf-8"))
    assert data["tokens"][:4] == ["[CLS]", "the", "artist", "painted"] and "<" in data["tokens"]
    assert (data["layer"], data["heads"], len(data["weights"])) == (1, [3], 2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["viz", text, "--model", tiny_checkpoint, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exist" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["viz", text, "--model", tiny_checkpoint, "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--layer", "1"], "give both"),
    (["--layer", "2", "--head", "0"], "layer=2 is not allowed: expected an integer in 0..1"),
    (["--text", ""], "is empty"),
    (["--text", "word " * 40], "text has 42 tokens, more than"),
])
def test_cli_viz_errors(tiny_checkpoint, tmp_path, capsys, argv, message):
    from attnlab.cli import main

    text = "the artist"
    if argv[0] == "--text":
        text, argv = argv[1], []
    assert main(["viz", text, "--model", tiny_checkpoint, "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab viz: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_viz_unknown_model(tmp_path, capsys):
    from attnlab.cli import main

    assert main(["viz", "hello", "--model", "gpt-5", "--out", str(tmp_path / "o")]) == 2
    assert "model='gpt-5' is not allowed: expected 'minilm', 'smollm2', an attnlab checkpoint folder or a local HF checkpoint folder" in capsys.readouterr().err
