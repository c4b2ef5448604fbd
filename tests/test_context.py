"""`attnlab context`: one word's vectors across sentences, cosine per layer.

Layer 0 is the token-embedding lookup, before attention and before any position term, so the same
token gives a similarity of exactly 1 there in every model (MiniLM, a GPT with learned positions,
a RoPE GPT); the hidden states are the models' own (they give forward's outputs back)."""

import json
import os

import numpy as np
import pytest
import torch

from attnlab import cli
from attnlab.data.tokenizer import CharTokenizer
from attnlab.errors import ConfigError
from attnlab.hf.checkpoint import from_hf_pretrained
from attnlab.models.encoder import Encoder, EncoderConfig
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.models.pretrained import AttentionModel, load_attention_model
from attnlab.surgery.context import (
    EXAMPLES, context_reports, contextual_similarity, cosine, format_reports, layer_descriptions, save_context,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["a bank of a river", "the bank took a loan", "on the river bank"]
CHARS = sorted(set("".join(SENTENCES) + "."))


def _gpt_model(positions: str) -> AttentionModel:
    cfg = GPTConfig(vocab_size=len(CHARS), block_size=32, n_layer=2, n_head=2, d_model=16, positions=positions)
    return AttentionModel(f"gpt-{positions}", GPT(cfg).eval(), CharTokenizer(CHARS), 32)


@pytest.fixture(scope="module")
def minilm():
    try:
        return load_attention_model("minilm")
    except ConfigError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


def test_cosine_of_identical_vectors_is_exactly_one():
    for seed in range(20):
        v = torch.randn(384, generator=torch.Generator().manual_seed(seed)) * 10 ** (seed % 7 - 3)
        assert cosine(v, v.clone()) == 1.0
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0


def test_gpt_hidden_states_are_the_residual_stream_forward_uses():
    for positions in ("learned", "rope"):
        model = _gpt_model(positions).model
        idx = torch.randint(len(CHARS), (2, 9))
        hidden = model.hidden_states(idx)
        assert len(hidden) == model.config.n_layer + 1
        assert torch.equal(hidden[0], model.wte(idx))  # before positions
        logits, _ = model(idx)
        assert torch.allclose(model.lm_head(model.norm_f(hidden[-1])), logits, atol=1e-6)
    with pytest.raises(ConfigError, match="block_size"):
        model.hidden_states(torch.zeros(1, 33, dtype=torch.long))


def test_encoder_hidden_states_start_at_the_word_piece_lookup():
    model = Encoder(EncoderConfig(vocab_size=50, d_model=16, n_layer=2, n_head=4, ffn_hidden=32)).eval()
    ids = torch.randint(50, (1, 7))
    hidden, forward = model.hidden_states(ids), model(ids)
    assert torch.equal(hidden[0], model.wte(ids)) and not torch.allclose(hidden[0], forward[0])
    assert all(torch.equal(a, b) for a, b in zip(hidden[1:], forward[1:]))


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_layer_zero_is_exactly_one_and_context_changes_the_rest(positions):
    report = contextual_similarity(_gpt_model(positions), SENTENCES, "bank")
    assert report.similarity.shape == (3, 3, 3)
    assert (report.similarity[0] == 1.0).all()  # the same 4 characters, at different positions
    assert (report.similarity[1:][:, ~np.eye(3, dtype=bool)] < 1.0).all()
    assert report.pieces == [["b", "a", "n", "k"]] * 3
    assert "before the learned positions" in report.layers[0] if positions == "learned" else "RoPE" in report.layers[0]


def test_minilm_layer_zero_is_the_word_piece_and_bank_separates_by_sense(minilm):
    bank = context_reports(minilm, word="bank")[0]
    assert bank.senses == list(EXAMPLES["bank"].senses) and len(bank.layers) == 7
    assert (bank.similarity[0] == 1.0).all() and "before position" in bank.layers[0]
    within, across = bank.mean("within"), bank.mean("across")
    assert within[0] == across[0] == 1.0 and (within[1:] > across[1:]).all()
    # The last layer's nearest words come from the word's own sentence, never the word itself.
    for sentence, near in zip(bank.sentences, bank.nearest):
        assert len(near) == 3 and all(w.casefold() in sentence.casefold() and w != "bank" for w, _ in near)
        assert [s for _, s in near] == sorted((s for _, s in near), reverse=True)


def test_nearest_words_are_cosines_of_the_last_layer():
    model = _gpt_model("learned")
    report = contextual_similarity(model, SENTENCES[:2], "bank", top=10)
    ids = torch.tensor([CharTokenizer(CHARS).encode(SENTENCES[0])])
    last = model.model.hidden_states(ids)[-1][0].double()
    bank, river = last[2:6].mean(0), last[12:17].mean(0)  # "a bank of a river": chars 2-5 and 12-16
    scores = dict(report.nearest[0])
    assert set(scores) == {"a", "of", "river"} and scores["river"] == pytest.approx(cosine(bank, river), abs=1e-12)


def test_json_has_the_schema_and_more_examples(tmp_path):
    reports = context_reports(_gpt_model("rope"), SENTENCES, "bank", senses="x,y,x")
    data = json.loads(format_reports(reports, "json"))
    assert data["word"] == "bank" and [e["layer"] for e in data["layers"]] == [0, 1, 2]
    assert all(np.array(e["similarity"]).shape == (3, 3) for e in data["layers"])
    assert data["layers"][0]["similarity"] == [[1.0] * 3] * 3 and "within" in data["layers"][1]
    paths = save_context(reports + reports, tmp_path / "out")
    assert [p.name for p in paths] == ["report.txt", "report.md", "report.json", "similarity_bank.png",
                                    "similarity_bank.png"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["word"] == "bank" and saved["more_examples"][0]["layers"] == data["layers"]
    with pytest.raises(ConfigError, match="already exists"):
        save_context(reports, tmp_path / "out")


@pytest.mark.parametrize("sentences, word, senses, top, message", [
    (["a bank"], "bank", None, 3, "at least 2"),
    (["a bank", ""], "bank", None, 3, "at least 2"),
    (["a bank", "a river"], "bank", None, 3, "not a word of sentence"),
    (["a bank", "the banks"], "bank", None, 3, r"sentence\(s\) 2"),
    (["a bank", "a bank"], "", None, 3, "expected one word"),
    (["a bank", "a bank"], "the bank", None, 3, "expected one word"),
    (["a bank", "a bank"], "bank", "x", 3, "one non-empty label per sentence"),
    (["a bank", "a bank"], "bank", None, 0, "top=0"),
    ("a bank", "bank", None, 3, "list of str"),
])
def test_bad_requests_are_refused_before_a_model_loads(sentences, word, senses, top, message):
    with pytest.raises(ConfigError if "list" not in message else TypeError, match=message):
        context_reports("no-such-model", sentences, word, senses=senses, top=top)


def test_builtin_examples_need_a_known_word():
    with pytest.raises(ConfigError, match="no built-in example"):
        context_reports("no-such-model", word="river")
    with pytest.raises(ConfigError, match="senses label your own sentences"):
        context_reports("no-such-model", senses="a,b")
    assert all(e.word in s.casefold() for e in EXAMPLES.values() for s in e.sentences)
    assert layer_descriptions(Encoder(EncoderConfig(d_model=8, n_head=2, n_layer=1, ffn_hidden=8)), 2)[1] == \
        "output of encoder layer 1"


def test_cli_context_text_out_and_refusals(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "ctx"
    argv = ["context", "I sat by the bank.", "The bank lent money.", "--word", "bank", "--model", tiny_checkpoint,
            "--senses", "river,money", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "layer 0 = word-piece embedding" in text and "wrote" in text and (out / "similarity_bank.png").is_file()
    before = (out / "report.json").read_bytes()
    no_bank = ["context", "I sat by the river.", "The bank lent money.", "--word", "bank", "--model", tiny_checkpoint]
    for bad, message in [(argv, "already exists"), (no_bank, "not a word of sentence(s) 1"),
                         (["context", "a bank", "the bank", "--model", tiny_checkpoint], "name the word"),
                         (["context", "only one bank", "--word", "bank"], "at least 2")]:
        assert cli.main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert (out / "report.json").read_bytes() == before


def test_gpt_hidden_states_equal_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(tmp_path / "llama")
    ours = from_hf_pretrained(tmp_path / "llama")
    ids = torch.randint(64, (2, 11))
    with torch.no_grad():
        expected = theirs(ids, output_hidden_states=True).hidden_states  # the last one after the final norm
        got = ours.hidden_states(ids)
    assert len(got) == len(expected) == 4
    for a, b in zip(got[:-1], expected[:-1]):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(ours.norm_f(got[-1]), expected[-1], atol=1e-5)


def test_differently_tokenized_occurrences_are_named_and_not_forced_to_one():
    chars = sorted(set("Bank is a bank. a bank"))
    cfg = GPTConfig(vocab_size=len(chars), block_size=32, n_layer=1, n_head=2, d_model=16)
    model = AttentionModel("gpt", GPT(cfg).eval(), CharTokenizer(chars), 32)
    report = contextual_similarity(model, ["Bank is a bank.", "a bank"], "BANK")
    assert report.pieces[0] == ["B", "a", "n", "k", "b", "a", "n", "k"]  # both occurrences, averaged
    assert report.similarity[0, 0, 1] < 1.0
    notes = " ".join(report.notes())
    assert "tokenized differently" in notes and "occurs more than once" in notes
