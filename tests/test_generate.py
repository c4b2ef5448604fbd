"""Generation: cached ≡ uncached decoding for every attention variant, sampling controls, errors."""

import json

import pytest
import torch

from attnlab.cli import main
from attnlab.data.tokenizer import CharTokenizer
from attnlab.errors import ConfigError
from attnlab import generate as generate_module
from attnlab.generate import generate, generate_text, sample_next, stream_tokens
from attnlab.models.gpt import GPT, GPTConfig

TINY = dict(vocab_size=20, block_size=16, n_layer=2, n_head=4, d_model=32, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
VARIANTS = {
    "mha-learned": dict(attention="mha", positions="learned"),
    "wrapper": dict(attention="wrapper", positions="learned"),
    "gqa-rope": dict(attention="gqa", n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu"),
    "mqa-rope": dict(attention="mqa", positions="rope"),
    "mla-naive": dict(attention="mla", positions="rope", mla_mode="naive"),
    "mla-absorbed-moe": dict(attention="mla", positions="rope", mla_mode="absorbed", ffn="moe",
                             n_routed_experts=4, n_activated_experts=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(name, sharpen=20.0):
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY, **VARIANTS[name])).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so the argmax is never a near tie
        model.lm_head.weight.mul_(sharpen)
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_equals_uncached_greedy_past_block_size(name):
    model = model_for(name)
    prompt = torch.randint(0, 20, (3, 5))
    # 5 + 20 tokens > block_size 16: the context is cropped and the cache refilled.
    cached = generate(model, prompt, 20, temperature=0, use_cache=True)
    uncached = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_equal_full_recompute_every_step(name):
    model = model_for(name)
    idx = torch.randint(0, 20, (2, 12))
    full, _ = model(idx)
    caches = model.new_caches(2, 16)
    steps = [model(idx[:, :4], caches=caches)[0]] + [model(idx[:, t:t + 1], caches=caches)[0] for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_same_seed_same_sample_with_and_without_cache():
    model = model_for("gqa-rope", sharpen=1.0)
    prompt = torch.randint(0, 20, (2, 3))
    a = generate(model, prompt, 12, temperature=1.0, top_k=3, seed=7)
    b = generate(model, prompt, 12, temperature=1.0, top_k=3, seed=7, use_cache=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, prompt, 12, temperature=1.0, top_k=3, seed=8))


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    samples = {int(sample_next(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert samples == {0, 1}
    # p(0) ≈ 0.50, p(1) ≈ 0.18, p(4) ≈ 0.17: top_p 0.6 keeps tokens 0 and 1 only
    samples = {int(sample_next(logits, temperature=1.0, top_p=0.6, generator=g)) for _ in range(200)}
    assert samples == {0, 1}
    assert int(sample_next(logits, temperature=1.0, top_p=0.1, generator=g)) == 0
    assert int(sample_next(logits, temperature=0)) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature=-1"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(max_new_tokens=-2), "max_new_tokens=-2"),
])
def test_bad_sampling_settings_fail_at_the_call(kwargs, match):
    model = model_for("mha-learned")
    n = kwargs.pop("max_new_tokens", 3)
    with pytest.raises(ConfigError, match=match):
        stream_tokens(model, torch.zeros(1, 2, dtype=torch.long), n, **kwargs)


@pytest.mark.parametrize("prompt_len, new, expected", [(5, 3, 8), (5, 20, 16), (20, 2, 16)])
def test_cache_holds_only_the_positions_the_call_can_fill(monkeypatch, prompt_len, new, expected):
    model = model_for("gqa-rope")
    sizes = []
    new_caches = model.new_caches
    monkeypatch.setattr(model, "new_caches", lambda b, n, **kw: sizes.append(n) or new_caches(b, n, **kw))
    prompt = torch.randint(0, 20, (1, prompt_len))
    cached = generate(model, prompt, new, temperature=0)
    assert set(sizes) == {expected}  # min(block_size 16, prompt + new)
    assert torch.equal(cached, generate(model, prompt, new, temperature=0, use_cache=False))


def scripted_sampler(monkeypatch, script):
    """Replace the sampler: step i returns the token ids script[i] (one per sequence)."""
    calls = []

    def sample(logits, **kwargs):
        calls.append(len(calls))
        return torch.tensor(script[len(calls) - 1])

    monkeypatch.setattr(generate_module, "sample_next", sample)
    return calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_ids_end_generation_once_every_sequence_stopped(monkeypatch, use_cache):
    model = model_for("mha-learned")
    prompt = torch.randint(3, 20, (2, 3))
    script = [[5, 6], [2, 7], [8, 9], [10, 1], [11, 12]]  # row 0 stops at step 2, row 1 at step 4
    calls = scripted_sampler(monkeypatch, script)
    out = generate(model, prompt, 10, temperature=0, use_cache=use_cache, stop_ids=[1, 2])
    assert len(calls) == 4
    assert out[:, :3].tolist() == prompt.tolist()
    assert out[:, 3:].tolist() == [[5, 2, 2, 2], [6, 7, 9, 1]]  # a stopped row repeats its stop token
    calls = scripted_sampler(monkeypatch, script)
    assert generate(model, prompt, 5, temperature=0, use_cache=use_cache).shape == (2, 8)  # no stop_ids: all 5
    assert len(calls) == 5


@pytest.mark.parametrize("stop_ids", [[20], [-1], "ab", 3, [True]])
def test_bad_stop_ids_fail_at_the_call(stop_ids):
    with pytest.raises(ConfigError, match="stop_ids="):
        stream_tokens(model_for("mha-learned"), torch.zeros(1, 2, dtype=torch.long), 3, stop_ids=stop_ids)


def saved_folder(tmp_path, name="mha-learned"):
    tokenizer = CharTokenizer.from_text("abcdefghij klmnopqr\n")
    model = GPT(GPTConfig(**{**TINY, "vocab_size": tokenizer.vocab_size}, **VARIANTS[name]))
    model.save_pretrained(tmp_path / "m", tokenizer)
    return tmp_path / "m"


def test_generate_text_streams_and_matches_without_cache(tmp_path):
    folder = saved_folder(tmp_path)
    pieces = list(generate_text(folder, "abc", 30, temperature=0))
    assert len(pieces) == 30 and all(len(p) == 1 for p in pieces)
    assert pieces == list(generate_text(folder, "abc", 30, temperature=0, use_cache=False))
    with pytest.raises(ConfigError, match="empty"):
        generate_text(folder, "", 5)


def test_cli_generate_streams_and_refuses_other_models(tmp_path, capsys):
    folder = saved_folder(tmp_path)
    assert main(["generate", str(folder), "--prompt", "ab", "--max-new-tokens", "10", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ab") and len(out) == 2 + 10 + 1
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "ngram"}))
    assert main(["generate", str(folder)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "'ngram' model" in err.err and len(err.err.strip().splitlines()) == 1
    assert main(["generate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_text_and_cli_stop_at_the_tokenizers_eos(tmp_path, monkeypatch, capsys):
    folder = saved_folder(tmp_path)
    load = generate_module.load_for_generation

    def load_with_eos(source, device="auto", dtype="auto"):
        model, tokenizer = load(source, device=device, dtype=dtype)
        tokenizer.eos_id = tokenizer.stoi["q"]
        return model, tokenizer

    monkeypatch.setattr(generate_module, "load_for_generation", load_with_eos)
    script = [[i] for i in CharTokenizer.from_text("abcdefghij klmnopqr\n").encode("hi qbed")]
    scripted_sampler(monkeypatch, script)
    assert "".join(generate_text(folder, "ab", 10)) == "hi "  # the eos "q" ends the text and is not shown
    scripted_sampler(monkeypatch, script)
    assert "".join(generate_text(folder, "ab", 7, stop_at_eos=False)) == "hi qbed"
    scripted_sampler(monkeypatch, script)
    assert main(["generate", str(folder), "--prompt", "ab", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == "abhi \n"
    scripted_sampler(monkeypatch, script)
    assert main(["generate", str(folder), "--prompt", "ab", "--max-new-tokens", "7", "--no-stop"]) == 0
    assert capsys.readouterr().out == "abhi qbed\n"
