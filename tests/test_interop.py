import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, GPT2Config, LlamaConfig  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402

from attnlab.attention import GroupedQueryAttention, causal_mask  # noqa: E402
from attnlab.hf import from_hf  # noqa: E402
from attnlab.hf.modules import HF_LOADERS  # noqa: E402
from attnlab.errors import ConfigError, InputTypeError  # noqa: E402

IMPLEMENTATIONS = ["eager", "sdpa"]


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _hf_mask(q_len, k_len):
    """HF's additive 4-D mask for bottom-right-aligned causal attention: 0 allowed, -inf hidden."""
    allowed = causal_mask(q_len, k_len)
    return torch.zeros(1, 1, q_len, k_len).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def _gpt2(impl, **kw):
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=1, attn_implementation=impl, **kw)
    return cfg, _randomise(GPT2Attention(cfg, layer_idx=0)).eval()


def _llama(impl, n_kv=2, bias=False, theta=500.0):
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=n_kv, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=64, attention_bias=bias, attn_implementation=impl,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    return cfg, _randomise(LlamaAttention(cfg, layer_idx=0)).eval(), LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gpt2_attention_loads_and_matches(impl):
    _, hf = _gpt2(impl)
    ours = from_hf(hf)
    assert isinstance(ours, GroupedQueryAttention) and not ours.training
    x = torch.randn(2, 7, 32)
    _close(ours(x), hf(x, attention_mask=_hf_mask(7, 7))[0])


def test_gpt2_inverse_layer_scaling():
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=3, attn_implementation="eager", scale_attn_by_inverse_layer_idx=True)
    hf = _randomise(GPT2Attention(cfg, layer_idx=2)).eval()
    x = torch.randn(1, 5, 32)
    _close(from_hf(hf)(x), hf(x, attention_mask=_hf_mask(5, 5))[0])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gpt2_with_dynamic_cache_vs_our_cache(impl):
    cfg, hf = _gpt2(impl)
    ours = from_hf(hf)
    x = torch.randn(2, 9, 32)
    hf_cache, our_cache = DynamicCache(config=cfg), ours.new_cache(2, 9)
    length = 0
    for t_new in (4, 1, 1, 3):
        chunk = x[:, length:length + t_new].contiguous()
        length += t_new
        expected = hf(chunk, past_key_values=hf_cache, attention_mask=_hf_mask(t_new, length))[0]
        _close(ours(chunk, cache=our_cache), expected)
    _close(our_cache.k[:, :, :length], hf_cache.layers[0].keys)
    _close(our_cache.v[:, :, :length], hf_cache.layers[0].values)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("n_kv, bias", [(4, True), (2, False), (1, False)], ids=["MHA+bias", "GQA", "MQA"])
def test_llama_attention_loads_and_matches(impl, n_kv, bias):
    _, hf, rotary = _llama(impl, n_kv, bias)
    ours = from_hf(hf)
    assert ours.n_kv_heads == n_kv and ours.rope is not None and ours.rope.theta == 500.0
    x = torch.randn(2, 6, 32)
    position_ids = torch.arange(6).expand(2, 6)
    expected = hf(x, position_embeddings=rotary(x, position_ids), attention_mask=_hf_mask(6, 6))[0]
    _close(ours(x), expected)


def test_llama_with_position_ids():
    """Per-row absolute positions (e.g. a continuation starting at 100 and one starting at 3)."""
    _, hf, rotary = _llama("eager")
    ours = from_hf(hf)
    x = torch.randn(2, 5, 32)
    position_ids = torch.stack([torch.arange(100, 105), torch.arange(3, 8)])
    expected = hf(x, position_embeddings=rotary(x, position_ids), attention_mask=_hf_mask(5, 5))[0]
    _close(ours(x, positions=position_ids), expected)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_llama_with_dynamic_cache_vs_our_cache(impl):
    cfg, hf, rotary = _llama(impl)
    ours = from_hf(hf)
    x = torch.randn(2, 10, 32)
    hf_cache, our_cache = DynamicCache(config=cfg), ours.new_cache(2, 16)
    length = 0
    for t_new in (5, 1, 1, 3):
        chunk = x[:, length:length + t_new].contiguous()
        position_ids = torch.arange(length, length + t_new).expand(2, t_new)
        length += t_new
        expected = hf(chunk, position_embeddings=rotary(chunk, position_ids), past_key_values=hf_cache,
                      attention_mask=_hf_mask(t_new, length))[0]
        _close(ours(chunk, cache=our_cache), expected)  # positions default to cache.length + arange
    _close(our_cache.k[:, :, :length], hf_cache.layers[0].keys)  # keys cached after RoPE, as HF does


def test_dtype_device_and_training_mode_follow_the_hf_module():
    _, hf, _ = _llama("eager")
    hf = hf.to(torch.bfloat16).train()
    ours = from_hf(hf)
    assert ours.training and ours.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(ours.k_proj.weight, hf.k_proj.weight)
    assert ours.k_proj.weight.data_ptr() != hf.k_proj.weight.data_ptr()  # a copy, not shared storage


def test_registry_and_errors():
    assert {"GPT2Attention", "LlamaAttention"} <= set(HF_LOADERS)
    with pytest.raises(ConfigError, match="from_hf got a Linear: expected one of .*GPT2Attention.*LlamaAttention"):
        from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(InputTypeError, match="got str"):
        from_hf("gpt2")
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                      rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_type='linear'"):
        from_hf(LlamaAttention(cfg, layer_idx=0))
    cross = GPT2Attention(GPT2Config(n_embd=32, n_head=4, add_cross_attention=True), is_cross_attention=True, layer_idx=0)
    with pytest.raises(ConfigError, match="is_cross_attention=True"):
        from_hf(cross)
