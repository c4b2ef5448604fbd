import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab import MultiHeadAttention, record_attention
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.errors import ConfigError, InputTypeError

VARIANTS = {"MHA": 4, "GQA": 2, "MQA": 1}


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("rope", [False, True])
def test_cached_decode_equals_full_recompute_every_step(n_kv, rope):
    attn = GroupedQueryAttention(32, 4, n_kv, rope=rope, rope_theta=500.0, qkv_bias=True).eval()
    x = torch.randn(2, 11, 32)
    full = attn(x)
    cache = attn.new_cache(2, 16)
    pieces = [(0, 5)] + [(t, t + 1) for t in range(5, 8)] + [(8, 11)]  # prefill, single tokens, a chunk
    for start, end in pieces:
        out = attn(x[:, start:end], cache=cache)
        _close(out, full[:, start:end])
        # every step also equals recomputing the whole prefix from scratch
        _close(out, attn(x[:, :end])[:, start:end])
    assert cache.length == 11


@pytest.mark.parametrize("n_kv", VARIANTS.values(), ids=VARIANTS.keys())
def test_fused_equals_explicit_and_recording(n_kv):
    attn = GroupedQueryAttention(24, 4, n_kv, head_dim=8, rope=True).eval()
    x = torch.randn(2, 7, 24)
    fused = attn(x)
    attn.fused = False
    _close(attn(x), fused)
    attn.fused = True
    with record_attention(attn) as rec:
        recorded = attn(x)
    _close(recorded, fused)
    w = rec.weights[0]
    assert w.shape == (2, 4, 7, 7)
    _close(w.sum(-1), torch.ones(2, 4, 7))
    assert torch.all(w.triu(1) == 0)


@pytest.mark.parametrize("n_kv", VARIANTS.values(), ids=VARIANTS.keys())
def test_future_tokens_never_change_earlier_outputs(n_kv):
    attn = GroupedQueryAttention(16, 4, n_kv, rope=True).eval()
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 16)
    _close(attn(x)[:, :5], attn(y)[:, :5])
    assert not torch.allclose(attn(x)[:, 5:], attn(y)[:, 5:])


def test_gqa_with_all_heads_equals_lecture_mha():
    torch.manual_seed(1)
    mha = MultiHeadAttention(24, 24, context_length=10, dropout=0.0, num_heads=3, qkv_bias=True).eval()
    gqa = GroupedQueryAttention(24, 3, 3, qkv_bias=True, out_bias=True).eval()
    with torch.no_grad():
        for ours, theirs in ((gqa.q_proj, mha.W_query), (gqa.k_proj, mha.W_key),
                             (gqa.v_proj, mha.W_value), (gqa.o_proj, mha.out_proj)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    x = torch.randn(2, 10, 24)
    _close(gqa(x), mha(x))


def test_mqa_is_gqa_with_one_kv_head_and_equals_repeated_kv_mha():
    """MQA ≡ GQA(1) ≡ MHA whose K/V projections repeat the single head for every query head."""
    mqa = GroupedQueryAttention(16, 4, 1, rope=True).eval()
    gqa1 = GroupedQueryAttention(16, 4, n_kv_heads=1, rope=True).eval()
    gqa1.load_state_dict(mqa.state_dict())
    mha = GroupedQueryAttention(16, 4, 4, rope=True).eval()
    with torch.no_grad():
        mha.q_proj.weight.copy_(mqa.q_proj.weight)
        mha.o_proj.weight.copy_(mqa.o_proj.weight)
        mha.k_proj.weight.copy_(mqa.k_proj.weight.repeat(4, 1))
        mha.v_proj.weight.copy_(mqa.v_proj.weight.repeat(4, 1))
    x = torch.randn(2, 6, 16)
    _close(mqa(x), gqa1(x))
    _close(mqa(x), mha(x))


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = GroupedQueryAttention(32, 8, 2, rope=True, rope_interleave=True).eval()
    mha = GroupedQueryAttention(32, 8, 8, rope=True, rope_interleave=True).eval()
    hd = 4
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, hd, 32)  # (nkv, hs, d)
            getattr(mha, name).weight.copy_(w.repeat_interleave(4, dim=0).reshape(32, 32))  # head h uses kv h // 4
    x = torch.randn(2, 5, 32)
    _close(gqa(x), mha(x))


def test_positions_and_padding_mask():
    """Left padding: with a mask hiding the pads and positions counted from the first real token,
    the padded row equals the unpadded sequence."""
    attn = GroupedQueryAttention(16, 4, 2, rope=True).eval()
    seq = torch.randn(1, 4, 16)
    padded = torch.cat([torch.randn(1, 2, 16), seq], dim=1)
    keep = torch.tensor([False, False, True, True, True, True])
    mask = keep.view(1, 1, 1, 6).expand(1, 1, 6, 6)
    positions = torch.tensor([0, 0, 0, 1, 2, 3])
    _close(attn(padded, positions=positions, attn_mask=mask)[:, 2:], attn(seq))


def test_bidirectional():
    attn = GroupedQueryAttention(8, 2, causal=False).eval()
    x = torch.randn(1, 4, 8)
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(attn(x)[:, 0], attn(y)[:, 0])


@settings(max_examples=15, deadline=None)
@given(n_kv=st.sampled_from([1, 2, 3, 6]), batch=st.integers(1, 3), seq=st.integers(1, 6),
       head_dim=st.sampled_from([2, 4, 6]), rope=st.booleans())
def test_shapes(n_kv, batch, seq, head_dim, rope):
    attn = GroupedQueryAttention(12, 6, n_kv, head_dim=head_dim, rope=rope).eval()
    out = attn(torch.randn(batch, seq, 12))
    assert out.shape == (batch, seq, 12)
    assert attn.new_cache(batch, 8).bytes_per_token() == 2 * n_kv * head_dim * 4


def test_new_cache_follows_module_dtype():
    attn = GroupedQueryAttention(16, 4, 2).to(torch.bfloat16)
    cache = attn.new_cache(1, 4)
    assert cache.dtype == torch.bfloat16 and cache.n_kv_heads == 2 and cache.k_dim == 4
    assert attn.new_cache(1, 4, dtype=torch.float32).dtype == torch.float32


def test_errors():
    with pytest.raises(ConfigError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        GroupedQueryAttention(24, 6, 4)
    with pytest.raises(ConfigError, match="d_model=10 is not divisible by n_heads=4"):
        GroupedQueryAttention(10, 4)
    with pytest.raises(ConfigError, match="dim=3"):
        GroupedQueryAttention(12, 4, rope=True)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        GroupedQueryAttention(8, 2, dropout=1.5)
    attn = GroupedQueryAttention(8, 2, 1)
    with pytest.raises(ConfigError, match="d_in=8"):
        attn(torch.randn(1, 3, 9))
    with pytest.raises(ConfigError, match=r"shape \(1, 1, 3, 4\).*Hkv=2"):
        attn(torch.randn(1, 3, 8), cache=GroupedQueryAttention(8, 2, 2).new_cache(1, 4))
    with pytest.raises(ConfigError, match="max_len=4"):
        attn(torch.randn(1, 5, 8), cache=attn.new_cache(1, 4))
    with pytest.raises(InputTypeError, match="bool"):
        attn(torch.randn(1, 3, 8), attn_mask=torch.ones(1, 1, 3, 3))


def test_dropout_only_in_training():
    attn = GroupedQueryAttention(16, 4, 2, dropout=0.5)
    x = torch.randn(1, 6, 16)
    assert not torch.allclose(attn(x), attn(x))  # weights dropped at random while training
    attn.eval()
    _close(attn(x), attn(x))
