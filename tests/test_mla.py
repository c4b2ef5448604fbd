"""MLA: absorbed ≡ naive, cached decode ≡ recompute, fused ≡ explicit, causality, recording,
errors, and equality with transformers' DeepSeek-V2/V3 attention after loading its weights."""

import pytest
import torch

from attnlab import ConfigError, InputTypeError, record_attention
from attnlab.attention.cache import KVCache, LatentKVCache
from attnlab.attention.mla import MultiHeadLatentAttention
from attnlab.hf.modules import mla_from_hf_deepseek

D_MODEL, N_HEADS = 32, 4
DIMS = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def make_mla(q_lora_rank=0, rope_interleave=True, **kw) -> MultiHeadLatentAttention:
    """A tiny MLA with random (not identity) RMSNorm gains, in eval mode."""
    m = MultiHeadLatentAttention(
        D_MODEL, N_HEADS, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave, **{**DIMS, **kw}
    )
    with torch.no_grad():
        m.kv_norm.weight.uniform_(0.5, 1.5)
        if q_lora_rank:
            m.q_norm.weight.uniform_(0.5, 1.5)
    return m.eval()


def run_mode(m, mode, *args, **kw):
    m.mode = mode
    with torch.no_grad():
        return m(*args, **kw)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("rope_interleave", [True, False])
def test_absorbed_equals_naive(q_lora_rank, rope_interleave):
    m = make_mla(q_lora_rank, rope_interleave)
    x = torch.randn(2, 9, D_MODEL)
    naive = run_mode(m, "naive", x)
    absorbed = run_mode(m, "absorbed", x)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=0)


def test_absorbed_equals_naive_with_padding_mask():
    m = make_mla(12)
    x = torch.randn(2, 6, D_MODEL)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, :2] = False  # sequence 1 is left-padded by two tokens
    mask[1, :, :2, 0] = True  # padded rows keep one key so no row is all -inf
    naive = run_mode(m, "naive", x, attn_mask=mask)
    absorbed = run_mode(m, "absorbed", x, attn_mask=mask)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=0)
    # The mask matters: sequence 1's unpadded rows differ from the unmasked run.
    assert not torch.allclose(run_mode(m, "naive", x)[1, 2:], naive[1, 2:], atol=1e-4)


def decode_steps(m, x, cache):
    """Feed x through m with a cache: prefill 4, three single tokens, then a chunk of 3."""
    bounds = [0, 4, 5, 6, 7, x.size(1)]
    outs = []
    with torch.no_grad():
        for start, end in zip(bounds, bounds[1:]):
            outs.append((start, end, m(x[:, start:end], cache=cache)))
    return outs


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_cached_decode_equals_full_recompute_every_step(mode, q_lora_rank):
    m = make_mla(q_lora_rank)
    m.mode = mode
    x = torch.randn(2, 10, D_MODEL)
    cache = m.new_cache(2, 16)
    assert isinstance(cache, KVCache if mode == "naive" else LatentKVCache)
    for start, end, y in decode_steps(m, x, cache):
        with torch.no_grad():
            full = m(x[:, :end])
        torch.testing.assert_close(y, full[:, start:end], atol=1e-5, rtol=0)
    assert cache.length == x.size(1)


def test_cached_absorbed_equals_cached_naive():
    m = make_mla(12, rope_interleave=False)
    x = torch.randn(2, 10, D_MODEL)
    m.mode = "naive"
    naive = decode_steps(m, x, m.new_cache(2, 10))
    m.mode = "absorbed"
    absorbed = decode_steps(m, x, m.new_cache(2, 10))
    for (_, _, a), (_, _, b) in zip(absorbed, naive):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_fused_equals_explicit_and_recorded_weights(mode):
    m = make_mla(12)
    m.mode = mode
    x = torch.randn(2, 7, D_MODEL)
    with torch.no_grad():
        fused = m(x)
        with record_attention(m) as rec:
            explicit = m(x)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
    weights = rec.weights[0]
    assert weights.shape == (2, N_HEADS, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, N_HEADS, 7))
    assert torch.all(weights.triu(1) == 0)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_recorded_cached_decode_equals_fused_cached_decode(mode):
    m = make_mla(12)
    m.mode = mode
    x = torch.randn(2, 10, D_MODEL)
    fused = decode_steps(m, x, m.new_cache(2, 10))
    with record_attention(m) as rec:
        explicit = decode_steps(m, x, m.new_cache(2, 10))
        assert rec.weights[0].shape == (2, N_HEADS, 3, 10)  # the last step: a chunk of 3 over 10 keys
    for (_, _, a), (_, _, b) in zip(explicit, fused):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_recorded_weights_agree_between_modes():
    m = make_mla()
    x = torch.randn(2, 5, D_MODEL)
    recorded = {}
    for mode in ("naive", "absorbed"):
        m.mode = mode
        with torch.no_grad(), record_attention(m) as rec:
            m(x)
        recorded[mode] = rec.weights[0]
    torch.testing.assert_close(recorded["absorbed"], recorded["naive"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_future_tokens_never_change_earlier_outputs(mode):
    m = make_mla(12)
    x = torch.randn(2, 8, D_MODEL)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 3, D_MODEL)
    a, b = run_mode(m, mode, x), run_mode(m, mode, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_shifting_every_position_leaves_output_unchanged(mode):
    """Decoupled RoPE makes scores depend on relative positions only; positions must reach RoPE."""
    m = make_mla()
    x = torch.randn(2, 6, D_MODEL)
    base = run_mode(m, mode, x)
    shifted = run_mode(m, mode, x, positions=torch.arange(6) + 37)
    torch.testing.assert_close(shifted, base, atol=1e-5, rtol=0)
    per_row = torch.stack([torch.arange(6), torch.arange(6) * 2])  # row 1: positions spread out
    spread = run_mode(m, mode, x, positions=per_row)
    torch.testing.assert_close(spread[0], base[0], atol=1e-5, rtol=0)
    assert not torch.allclose(spread[1], base[1], atol=1e-4)


def test_kv_elements_per_token_matches_cache_and_paper():
    m = make_mla()
    for mode in ("naive", "absorbed"):
        m.mode = mode
        cache = m.new_cache(3, 8, dtype=torch.bfloat16)
        assert cache.bytes_per_token() == m.kv_elements_per_token() * 2
    with torch.device("meta"):  # DeepSeek-V3's attention dims, no memory allocated
        v3 = MultiHeadLatentAttention(7168, 128, q_lora_rank=1536, mode="absorbed")
    assert v3.kv_elements_per_token() == 512 + 64
    v3.mode = "naive"
    assert v3.kv_elements_per_token() == 128 * (128 + 64 + 128)


def test_training_gradients_agree_between_modes():
    m = make_mla(12)
    x = torch.randn(2, 5, D_MODEL)
    grads = {}
    for mode in ("naive", "absorbed"):
        m.zero_grad()
        m.mode = mode
        m(x).square().sum().backward()
        grads[mode] = m.wkv_b.weight.grad.clone()
    torch.testing.assert_close(grads["absorbed"], grads["naive"], atol=1e-5, rtol=1e-5)


def test_errors_name_the_values():
    with pytest.raises(ConfigError, match="qk_rope_head_dim=5"):
        MultiHeadLatentAttention(D_MODEL, N_HEADS, **{**DIMS, "qk_rope_head_dim": 5})
    with pytest.raises(ConfigError, match="kv_lora_rank=0"):
        MultiHeadLatentAttention(D_MODEL, N_HEADS, **{**DIMS, "kv_lora_rank": 0})
    with pytest.raises(ConfigError, match="q_lora_rank=-1"):
        MultiHeadLatentAttention(D_MODEL, N_HEADS, q_lora_rank=-1, **DIMS)
    with pytest.raises(ConfigError, match="mode='fast'"):
        MultiHeadLatentAttention(D_MODEL, N_HEADS, mode="fast", **DIMS)
    m = make_mla()
    with pytest.raises(ConfigError, match="mode='latent'"):
        m.mode = "latent"
    naive_cache = m.new_cache(2, 8)
    m.mode = "absorbed"
    with pytest.raises(InputTypeError, match="KVCache.*mode='absorbed'.*LatentKVCache"):
        m(torch.randn(2, 3, D_MODEL), cache=naive_cache)
    with pytest.raises(ConfigError, match="expected d_in=32"):
        m(torch.randn(2, 3, 31))
    with pytest.raises(InputTypeError, match="attn_mask"):
        m(torch.randn(2, 3, D_MODEL), attn_mask=torch.ones(2, 1, 3, 3))


# --- transformers' DeepSeek attention ---------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402


def hf_config(version, q_lora_rank, **kw):
    cls = transformers.DeepseekV3Config if version == 3 else transformers.DeepseekV2Config
    config = cls(
        hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, q_lora_rank=q_lora_rank,
        vocab_size=11, num_hidden_layers=1, intermediate_size=8, moe_intermediate_size=8, **DIMS, **kw,
    )
    config._attn_implementation = "eager"
    return config


def hf_attention(version, q_lora_rank=None, **kw):
    config = hf_config(version, q_lora_rank, **kw)
    attention = (hf_v3.DeepseekV3Attention if version == 3 else hf_v2.DeepseekV2Attention)(config, layer_idx=0)
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0.0 if p.dim() == 2 else 1.0, 0.2)  # linears ~ N(0, .2), RMSNorm gains ~ N(1, .2)
    return attention.eval()


def hf_forward(attention, x, position_ids, past_key_values=None):
    """Run the HF module with a bottom-right causal additive mask, as its decoder layer would."""
    config = attention.config
    rotary = (hf_v3.DeepseekV3RotaryEmbedding if config.model_type == "deepseek_v3" else hf_v2.DeepseekV2RotaryEmbedding)
    position_embeddings = rotary(config)(x, position_ids)
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    t = x.size(1)
    allowed = torch.ones(t, past + t, dtype=torch.bool).tril(past)
    mask = torch.zeros(t, past + t).masked_fill(~allowed, float("-inf"))[None, None]
    with torch.no_grad():
        return attention(
            x, position_embeddings=position_embeddings, attention_mask=mask, past_key_values=past_key_values,
        )[0]


HF_CASES = [(3, None, True), (3, 12, True), (3, None, False), (3, 12, False), (2, None, None), (2, 12, None)]


@pytest.mark.parametrize("version,q_lora_rank,interleave", HF_CASES)
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_hf_deepseek_loader_equals_hf_module_with_position_ids(version, q_lora_rank, interleave, mode):
    kw = {} if interleave is None else {"rope_interleave": interleave}
    reference = hf_attention(version, q_lora_rank, **kw)
    ours = mla_from_hf_deepseek(reference)
    ours.mode = mode
    assert ours.rope_interleave is (True if interleave is None else interleave)
    x = torch.randn(2, 6, D_MODEL)
    position_ids = torch.stack([torch.arange(6) + 3, torch.arange(6) * 2 + 1])
    expected = hf_forward(reference, x, position_ids)
    with torch.no_grad():
        got = ours(x, positions=position_ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version,q_lora_rank,interleave", [(3, 12, True), (3, None, False), (2, None, None)])
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_hf_deepseek_loader_equals_hf_module_with_cache(version, q_lora_rank, interleave, mode):
    kw = {} if interleave is None else {"rope_interleave": interleave}
    reference = hf_attention(version, q_lora_rank, **kw)
    ours = mla_from_hf_deepseek(reference)
    ours.mode = mode
    x = torch.randn(2, 8, D_MODEL)
    hf_cache = transformers.DynamicCache(config=reference.config)
    cache = ours.new_cache(2, 8)
    for start, end in [(0, 5), (5, 6), (6, 8)]:
        expected = hf_forward(reference, x[:, start:end], torch.arange(start, end)[None].expand(2, -1), hf_cache)
        with torch.no_grad():
            got = ours(x[:, start:end], cache=cache)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_hf_deepseek_loader_rejects_what_it_cannot_match():
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        mla_from_hf_deepseek(hf_attention(3, None, rope_parameters=yarn, max_position_embeddings=256))
    with pytest.raises(ConfigError, match="attention_bias=True"):
        mla_from_hf_deepseek(hf_attention(3, None, attention_bias=True))
    with pytest.raises(InputTypeError, match="Linear"):
        mla_from_hf_deepseek(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("version", [2, 3])
def test_from_hf_dispatches_deepseek_attention(version):
    from attnlab.hf import from_hf

    reference = hf_attention(version, 12)
    ours = from_hf(reference)
    assert isinstance(ours, MultiHeadLatentAttention) and not ours.training
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        got = ours(x)
    torch.testing.assert_close(got, hf_forward(reference, x, torch.arange(5)[None].expand(2, -1)), atol=1e-5, rtol=0)
