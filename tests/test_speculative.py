"""Speculative greedy decoding: whatever the draft proposes, the tokens are the model's own greedy
tokens (cached decoding one at a time), the draft decides only how many come per pass; a cache can
drop its newest tokens; generate/CLI ``--speculate`` equal plain greedy decoding of the unquantized model."""

import copy

import pytest
import torch

from attnlab.attention.cache import KVCache, LatentKVCache
from attnlab.cli import main
from attnlab.data.tokenizer import CharTokenizer
from attnlab.errors import ConfigError, InputTypeError
from attnlab.generate import generate_text, speculative_tokens, stream_tokens
from attnlab.models.gpt import GPT
from attnlab.models.rnn import RNNLM, RNNConfig
from attnlab.quantize import quantize_int4

from tiny_decoders import sharp_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"vocab_size": 48, "block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64,
        "attention": "gqa", "positions": "rope", "norm": "rmsnorm", "activation": "swiglu", "tie_embeddings": False,
        "ffn_hidden": 160}


def tiny_gpt(seed=5, **overrides) -> GPT:
    """Sharp logits (no near ties for the last bits of batched arithmetic to flip) and larger weights, so
    the greedy tokens depend on the context."""
    model = sharp_gpt({**TINY, **overrides}, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("lm_head"):
                p.mul_(8.0)
    return model


def greedy(model, prompt, n, **kwargs) -> list[int]:
    return [int(t[0]) for t in stream_tokens(model, prompt, n, temperature=0, **kwargs)]


def speculated(model, draft, prompt, n, **kwargs) -> tuple[list[int], dict]:
    stats = {}
    tokens = [int(t[0]) for t in speculative_tokens(model, draft, prompt, n, stats=stats, **kwargs)]
    return tokens, stats


PROMPT = torch.tensor([[3, 17, 5, 9, 22]])


def quantized_copy(model):
    draft = copy.deepcopy(model)
    quantize_int4(draft)
    return draft


@pytest.mark.parametrize("draft_tokens", [1, 3, 16])
@pytest.mark.parametrize("draft_kind", ["itself", "int4", "unrelated"])
def test_speculative_tokens_are_the_models_greedy_tokens(draft_tokens, draft_kind):
    model = tiny_gpt()
    draft = {"itself": model, "int4": quantized_copy(model), "unrelated": tiny_gpt(seed=11)}[draft_kind]
    n = 20  # 5 + 20 tokens stay inside block_size 32
    tokens, stats = speculated(model, draft, PROMPT, n, draft_tokens=draft_tokens)
    expected = greedy(model, PROMPT, n)
    assert tokens == expected and len(set(expected)) > 5  # a varied continuation, not one repeated token
    assert 0 <= stats["accepted"] <= stats["proposed"] and stats["passes"] >= 1
    if draft_kind == "itself":
        assert stats["accepted"] == stats["proposed"]  # a draft equal to the model is always right
        assert stats["passes"] == -(-(n - 1) // (draft_tokens + 1))  # each pass: k drafts + the model's own
    if draft_kind != "itself":
        assert stats["accepted"] < stats["proposed"]  # the test exercises rejections too


def test_speculative_decoding_past_the_block_size_and_at_stop_ids():
    model = tiny_gpt()
    draft = quantized_copy(model)
    # 5 + 40 > block_size 32: the last positions are decoded with the cropped context, as plain decoding does.
    assert speculated(model, draft, PROMPT, 40, draft_tokens=6)[0] == greedy(model, PROMPT, 40)
    plain = greedy(model, PROMPT, 20)
    stop = plain[7]
    tokens, _ = speculated(model, draft, PROMPT, 20, stop_ids=[stop])
    assert tokens == plain[:plain.index(stop) + 1]
    assert speculated(model, draft, PROMPT, 0)[0] == []


def test_speculative_tokens_refuses_what_it_cannot_do():
    model = tiny_gpt()
    with pytest.raises(InputTypeError, match="one sequence"):
        speculative_tokens(model, model, PROMPT.repeat(2, 1), 4)
    with pytest.raises(ConfigError, match="empty"):
        speculative_tokens(model, model, PROMPT[:, :0], 4)
    with pytest.raises(ConfigError, match="vocab_size=40 but the model 48"):
        speculative_tokens(model, tiny_gpt(vocab_size=40), PROMPT, 4)
    with pytest.raises(ConfigError, match="attnlab GPT"):
        speculative_tokens(model, RNNLM(RNNConfig(vocab_size=48, d_model=8, n_layer=1)), PROMPT, 4)
    with pytest.raises(ConfigError, match="draft_tokens"):
        speculative_tokens(model, model, PROMPT, 4, draft_tokens=0)
    with pytest.raises(ConfigError, match="stop_ids"):
        speculative_tokens(model, model, PROMPT, 4, stop_ids=[99])


@pytest.mark.parametrize("cache", [KVCache(1, 2, 8, 4), LatentKVCache(1, 8, 6, 2)])
def test_a_cache_truncated_forgets_its_newest_tokens(cache):
    fields = (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) if isinstance(cache, KVCache) else \
        (torch.randn(1, 5, 6), torch.randn(1, 5, 2))
    cache.update(*fields)
    cache.truncate(3)
    assert cache.length == 3
    newer = tuple(torch.ones_like(f[..., :2, :] if isinstance(cache, KVCache) else f[:, :2]) for f in fields)
    got = cache.update(*newer)
    for field, new, out in zip(fields, newer, got):
        kept = field[..., :3, :] if isinstance(cache, KVCache) else field[:, :3]
        assert torch.equal(out, torch.cat([kept, new], dim=-2 if isinstance(cache, KVCache) else 1))
    with pytest.raises(ConfigError, match="truncate\\(length=9\\).*holds 5 tokens"):
        cache.truncate(9)
    with pytest.raises(ConfigError, match="length"):
        cache.truncate(-1)


def saved_folder(tmp_path):
    tokenizer = CharTokenizer.from_text("abcdefghij klmnopqr\n")
    model = tiny_gpt(vocab_size=tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "gpt", tokenizer)
    return tmp_path / "gpt"


def test_generate_text_and_the_cli_speculate_equal_plain_greedy_decoding(tmp_path, capsys):
    folder = saved_folder(tmp_path)
    plain = "".join(generate_text(folder, "abc", 20, temperature=0, dtype="float32"))
    for quantize in ("int4", "int8", "auto"):
        got = "".join(generate_text(folder, "abc", 20, temperature=0, dtype="float32", quantize=quantize,
                                    speculate=True, draft_tokens=4))
        assert got == plain and len(got) == 20
    argv = ["generate", str(folder), "--prompt", "abc", "--max-new-tokens", "20", "--temperature", "0",
            "--dtype", "float32", "--quantize", "int4", "--speculate", "--draft-tokens", "5"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "abc" + plain + "\n"


def test_speculate_needs_greedy_decoding_a_quantized_draft_and_a_gpt(tmp_path, capsys):
    folder = saved_folder(tmp_path)
    for bad in (["--temperature", "0.8", "--quantize", "int4"], ["--temperature", "0"],
                ["--temperature", "0", "--quantize", "int4", "--draft-tokens", "0"]):
        assert main(["generate", str(folder), "--prompt", "ab", "--speculate", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("speculate" in err or "draft_tokens" in err)
    rnn_tokenizer = CharTokenizer.from_text("abcdefghij klmnopqr\n")
    RNNLM(RNNConfig(vocab_size=rnn_tokenizer.vocab_size, d_model=8, n_layer=1)).save_pretrained(tmp_path / "rnn",
                                                                                                rnn_tokenizer)
    with pytest.raises(ConfigError, match="speculate is not allowed for a RNNLM"):
        list(generate_text(tmp_path / "rnn", "ab", 4, temperature=0, quantize="int4", speculate=True))
