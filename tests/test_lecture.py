"""The lecture's attention path: its own numbers, equivalences between variants, masks, dropout, errors."""

import pytest
import torch

from attnlab.attention import kernel
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    record_attention,
    simple_self_attention,
)
from attnlab.errors import ConfigError, InputTypeError, UserError

from lecture_inputs import BATCH, INPUTS


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-4, rtol=0)


# --- the lecture's seeded numbers (LLMs-from-scratch ch03) -------------------------------------

def test_simple_self_attention_matches_lecture():
    context, weights = simple_self_attention(INPUTS)
    _close(context[1], [0.4419, 0.6515, 0.5683])  # "journey"
    _close(weights[1], [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581])
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    # by definition: softmax of plain dot products, then a weighted sum
    manual = torch.softmax(INPUTS @ INPUTS.T, dim=-1)
    torch.testing.assert_close(weights, manual)
    torch.testing.assert_close(context, manual @ INPUTS)


def test_self_attention_v1_v2_match_lecture():
    torch.manual_seed(123)
    _close(SelfAttentionV1(3, 2)(INPUTS)[0], [0.2996, 0.8053])
    torch.manual_seed(789)
    _close(SelfAttentionV2(3, 2)(INPUTS)[0], [-0.0739, 0.0713])


def test_causal_wrapper_and_mha_match_lecture():
    torch.manual_seed(123)
    out = CausalAttention(3, 2, 6, 0.0)(BATCH)
    assert out.shape == (2, 6, 2)
    _close(out[0, 0], [-0.4519, 0.2216])
    _close(out[0, 5], [-0.5299, -0.1081])

    torch.manual_seed(123)
    out = MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)(BATCH)
    assert out.shape == (2, 6, 4)
    _close(out[0, 0], [-0.4519, 0.2216, 0.4772, 0.1063])

    torch.manual_seed(123)
    out = MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)(BATCH)
    assert out.shape == (2, 6, 2)
    _close(out[0, 0], [0.3190, 0.4858])
    _close(out[0, 5], [0.2575, 0.4028])


def test_parameter_creation_order_is_the_lecture_order():
    m = MultiHeadAttention(3, 4, 6, 0.0, num_heads=2)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["W_query.weight", "W_key.weight", "W_value.weight", "out_proj.weight", "out_proj.bias"]


def test_v1_and_v2_agree_given_the_same_weights():
    v2 = SelfAttentionV2(3, 2)
    v1 = SelfAttentionV1(3, 2)
    with torch.no_grad():
        v1.W_query.copy_(v2.W_query.weight.T)
        v1.W_key.copy_(v2.W_key.weight.T)
        v1.W_value.copy_(v2.W_value.weight.T)
    torch.testing.assert_close(v1(INPUTS), v2(INPUTS))
    torch.testing.assert_close(v1(BATCH), v2(BATCH))


# --- wrapper ≡ weight-split MHA ----------------------------------------------------------------

def _mha_from_wrapper(wrapper: MultiHeadAttentionWrapper) -> MultiHeadAttention:
    """Stack the wrapper's per-head weights into MHA's split weights; out_proj = identity."""
    heads = wrapper.heads
    head_dim = heads[0].d_out
    mha = MultiHeadAttention(wrapper.d_in, head_dim * len(heads), heads[0].context_length, 0.0, len(heads),
                             qkv_bias=heads[0].W_query.bias is not None)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(mha, name).weight.copy_(torch.cat([getattr(h, name).weight for h in heads], dim=0))
            if getattr(mha, name).bias is not None:
                getattr(mha, name).bias.copy_(torch.cat([getattr(h, name).bias for h in heads], dim=0))
        mha.out_proj.weight.copy_(torch.eye(mha.d_out))
        mha.out_proj.bias.zero_()
    return mha


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_wrapper_equals_weight_split_mha_forward_and_gradients(qkv_bias):
    torch.manual_seed(0)
    wrapper = MultiHeadAttentionWrapper(8, 3, 11, 0.0, num_heads=4, qkv_bias=qkv_bias)
    mha = _mha_from_wrapper(wrapper)
    x = torch.randn(2, 11, 8)
    out_w, out_m = wrapper(x), mha(x)
    torch.testing.assert_close(out_w, out_m, atol=1e-6, rtol=1e-5)

    grad = torch.randn_like(out_w)
    out_w.backward(grad)
    out_m.backward(grad)
    for name in ("W_query", "W_key", "W_value"):
        stacked = torch.cat([getattr(h, name).weight.grad for h in wrapper.heads], dim=0)
        torch.testing.assert_close(stacked, getattr(mha, name).weight.grad, atol=1e-6, rtol=1e-5)


# --- fused ≡ explicit, recorded weights ----------------------------------------------------------

def _all_modules():
    return {
        "v1": SelfAttentionV1(8, 4),
        "v2": SelfAttentionV2(8, 4, qkv_bias=True),
        "causal": CausalAttention(8, 4, 16, 0.0),
        "wrapper": MultiHeadAttentionWrapper(8, 4, 16, 0.0, num_heads=3),
        "mha": MultiHeadAttention(8, 6, 16, 0.0, num_heads=3),
    }


@pytest.mark.parametrize("name", ["v1", "v2", "causal", "wrapper", "mha"])
def test_fused_equals_explicit(name, monkeypatch):
    module = _all_modules()[name]
    x = torch.randn(3, 10, 8)
    calls = []
    sdpa = kernel.F.scaled_dot_product_attention
    monkeypatch.setattr(kernel.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    module.fused = False
    explicit = module(x)
    assert calls == []  # the lecture's own path: scores, mask, softmax
    module.fused = True
    fused = module(x)
    assert calls  # SDPA did the work
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,heads,causal", [
    ("v1", 1, False), ("v2", 1, False), ("causal", 1, True), ("wrapper", 3, True), ("mha", 3, True),
])
def test_recorded_weights(name, heads, causal):
    module = _all_modules()[name]
    module.fused = True
    x = torch.randn(2, 7, 8)
    plain = module(x)
    with record_attention(module) as rec:
        recorded_out = module(x)
    torch.testing.assert_close(recorded_out, plain, atol=1e-6, rtol=0)  # recording never changes the output
    assert len(rec) == 1
    w = rec.weights[0]
    assert w.shape == (2, heads, 7, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, heads, 7))
    above = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)
    if causal:
        assert torch.all(w[..., above] == 0)
    else:
        assert torch.all(w[..., above] > 0)
    assert module.fused and not module._recording  # fused again after the block


def test_recording_finds_modules_inside_a_model():
    model = torch.nn.Sequential(MultiHeadAttention(8, 8, 16, 0.0, 2), MultiHeadAttentionWrapper(8, 2, 16, 0.0, 4))
    with record_attention(model) as rec:
        model(torch.randn(1, 5, 8))
    assert rec.names == ["0", "1"]
    assert [w.shape for w in rec.weights] == [(1, 2, 5, 5), (1, 4, 5, 5)]
    # The wrapper reports its heads through itself, in head order.
    with record_attention(model[1].heads[2]) as single:
        model(torch.randn(1, 5, 8))
    assert single.weights[0].shape == (1, 1, 5, 5)


def test_wrapper_recorded_heads_are_its_single_heads():
    wrapper = MultiHeadAttentionWrapper(8, 4, 16, 0.0, num_heads=3)
    x = torch.randn(2, 6, 8)
    with record_attention(wrapper) as rec:
        wrapper(x)
    for i, head in enumerate(wrapper.heads):
        torch.testing.assert_close(rec.weights[0][:, i], head.last_attention[:, 0])


# --- causality ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["causal", "wrapper", "mha"])
@pytest.mark.parametrize("fused", [False, True])
def test_changing_a_token_never_changes_earlier_outputs(name, fused):
    module = _all_modules()[name]
    module.fused = fused
    x = torch.randn(2, 9, 8)
    t = 5
    y = x.clone()
    y[:, t] += torch.randn(2, 8)
    before, after = module(x), module(y)
    torch.testing.assert_close(before[:, :t], after[:, :t], atol=0, rtol=0)
    assert not torch.allclose(before[:, t:], after[:, t:])


# --- dropout -----------------------------------------------------------------------------------

def test_dropout_zero_is_deterministic_in_train_mode():
    module = MultiHeadAttention(8, 8, 16, 0.0, 2).train()
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(module(x), module(x), atol=0, rtol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_dropout_active_in_train_and_off_in_eval(fused):
    torch.manual_seed(1)
    module = MultiHeadAttention(8, 8, 16, 0.5, 2, fused=fused)
    x = torch.randn(2, 12, 8)
    module.train()
    assert not torch.allclose(module(x), module(x))
    module.eval()
    eval_out = module(x)
    torch.testing.assert_close(eval_out, module(x), atol=0, rtol=0)
    no_dropout = MultiHeadAttention(8, 8, 16, 0.0, 2)
    no_dropout.load_state_dict(module.state_dict())
    torch.testing.assert_close(eval_out, no_dropout.train()(x), atol=1e-6, rtol=0)


def test_dropout_scales_kept_weights_like_the_lecture():
    # Explicit path: each causal weight is either dropped (0) or scaled by 1 / (1 - p).
    module = CausalAttention(3, 2, 6, 0.5).train()
    plain = CausalAttention(3, 2, 6, 0.0)
    plain.load_state_dict(module.state_dict())
    with record_attention(plain) as rec:
        plain(BATCH)
    torch.manual_seed(123)
    out = module(BATCH)
    torch.manual_seed(123)
    keep = torch.nn.functional.dropout(rec.weights[0], 0.5, training=True)
    torch.testing.assert_close(out, keep[:, 0] @ module.W_value(BATCH), atol=1e-6, rtol=0)


# --- shapes (property) -------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), seq=st.integers(1, 9), d_in=st.integers(1, 9),
    heads=st.integers(1, 4), head_dim=st.integers(1, 4), extra=st.integers(0, 4),
)
def test_shapes_property(batch, seq, d_in, heads, head_dim, extra):
    context_length = seq + extra
    x = torch.randn(batch, seq, d_in)
    mha = MultiHeadAttention(d_in, heads * head_dim, context_length, 0.0, heads)
    wrapper = MultiHeadAttentionWrapper(d_in, head_dim, context_length, 0.0, heads)
    assert mha(x).shape == (batch, seq, heads * head_dim)
    assert wrapper(x).shape == (batch, seq, heads * head_dim)
    assert CausalAttention(d_in, head_dim, context_length, 0.0)(x).shape == (batch, seq, head_dim)
    with record_attention(mha) as rec:
        mha(x)
    assert rec.weights[0].shape == (batch, heads, seq, seq)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: MultiHeadAttention(3, 5, 6, 0.0, num_heads=2), r"d_out=5 is not divisible by num_heads=2"),
    (lambda: MultiHeadAttention(3, 4, 6, 1.0, num_heads=2), r"dropout=1.0 .*\[0, 1\)"),
    (lambda: CausalAttention(3, 2, 6, -0.1), r"dropout=-0.1 .*\[0, 1\)"),
    (lambda: MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=0), r"num_heads=0 .*positive integer"),
    (lambda: SelfAttentionV2(0, 2), r"d_in=0 .*positive integer"),
    (lambda: CausalAttention(3, 2, 2.5, 0.0), r"context_length=2.5 .*positive integer"),
])
def test_config_errors_name_the_argument(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_sequence_longer_than_context_length():
    with pytest.raises(ConfigError, match=r"7 tokens, more than context_length=6"):
        MultiHeadAttention(3, 2, 6, 0.0, 2)(torch.randn(1, 7, 3))
    with pytest.raises(ConfigError, match=r"context_length=6"):
        CausalAttention(3, 2, 6, 0.0)(torch.randn(1, 7, 3))


@pytest.mark.parametrize("x,match", [
    (torch.randn(6, 3), r"rank 2 .*expected \(batch, seq, d_in\)"),
    (torch.ones(1, 6, 3, dtype=torch.long), r"dtype torch.int64: expected a floating dtype"),
    ([[0.1, 0.2, 0.3]], r"must be a torch.Tensor, got list"),
])
def test_input_type_errors(x, match):
    with pytest.raises(InputTypeError, match=match):
        MultiHeadAttention(3, 2, 6, 0.0, 2)(x)


def test_wrong_feature_size():
    with pytest.raises(ConfigError, match=r"last dimension 4 .*expected d_in=3"):
        SelfAttentionV1(3, 2)(torch.randn(6, 4))


def test_errors_are_value_and_type_errors():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, UserError)
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, UserError)
    assert attnlab.UserError is UserError
