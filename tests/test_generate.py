"""Generation: cached ≡ uncached decoding for every attention variant, sampling controls, errors."""

import json

import pytest
import torch

from attnlab.cli import main
from attnlab.data.tokenizer import CharTokenizer
from attnlab.errors import ConfigError
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


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
