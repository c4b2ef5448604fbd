"""The one attention kernel: the fused path (SDPA, with its two CPU workarounds) equals the
explicit path over a hypothesis-generated space of shapes, grouped K/V heads, masks, causal
offsets (cached decoding) and MLA's unequal head widths; the workarounds are checked on their own."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from attnlab.attention.kernel import attend, causal_mask, fold_grouped_queries, pad_to_one_head_dim
from attnlab.errors import ConfigError


def by_hand(q, k, v, *, causal=False, mask=None, scale=None):
    """softmax(q kᵀ · scale) v, one query head at a time, each reading its group's K/V head."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, H, Tq, v.size(-1), dtype=q.dtype)
    for h in range(H):
        kv = h // (H // Hkv)
        scores = q[:, h] @ k[:, kv].transpose(-2, -1) * scale  # (B, Tq, Tk)
        allowed = torch.ones(B, Tq, Tk, dtype=torch.bool)
        if causal:
            allowed &= torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
        if mask is not None:
            allowed &= mask.expand(B, H, Tq, Tk)[:, h]
        out[:, h] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, kv]
    return out


@st.composite
def cases(draw):
    n_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    k_len = draw(st.integers(1, 12))
    q_len = draw(st.integers(1, k_len))  # queries are the last q_len positions (a KV cache's prefill/decode)
    qk_dim = draw(st.sampled_from([4, 8, 12]))
    v_dim = draw(st.sampled_from([qk_dim, 4, 6]))  # MLA: values narrower than queries/keys
    mask_kind = draw(st.sampled_from([None, "per-batch", "per-head", "keys-only"]))
    return dict(batch=draw(st.integers(1, 3)), n_heads=n_kv * group, n_kv=n_kv, q_len=q_len, k_len=k_len,
                qk_dim=qk_dim, v_dim=v_dim, causal=draw(st.booleans()), mask_kind=mask_kind,
                scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2**16)))


def tensors(c):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["batch"], c["n_heads"], c["q_len"], c["qk_dim"], generator=g, dtype=torch.float64)
    k = torch.randn(c["batch"], c["n_kv"], c["k_len"], c["qk_dim"], generator=g, dtype=torch.float64)
    v = torch.randn(c["batch"], c["n_kv"], c["k_len"], c["v_dim"], generator=g, dtype=torch.float64)
    shape = {"per-batch": (c["batch"], 1, c["q_len"], c["k_len"]), "per-head": (c["batch"], c["n_heads"], c["q_len"],
             c["k_len"]), "keys-only": (c["batch"], 1, 1, c["k_len"])}.get(c["mask_kind"])
    mask = None
    if shape is not None:  # each query may always see its own position: no row is ever empty, causal or not
        mask = torch.rand(shape, generator=g) > 0.4
        own = torch.arange(c["q_len"]) + c["k_len"] - c["q_len"]
        if c["mask_kind"] == "keys-only":
            mask[..., own] = True
        else:
            mask[..., torch.arange(c["q_len"]), own] = True
    return q, k, v, mask


@settings(max_examples=150, deadline=None)
@given(cases())
def test_fused_equals_explicit_equals_a_hand_computation(c):
    q, k, v, mask = tensors(c)
    kw = dict(causal=c["causal"], mask=mask, scale=c["scale"])
    fused, none = attend(q.float(), k.float(), v.float(), fused=True, **kw)
    explicit, weights = attend(q, k, v, fused=False, **kw)
    expected = by_hand(q, k, v, **kw)
    assert none is None and weights.shape == (c["batch"], c["n_heads"], c["q_len"], c["k_len"])
    torch.testing.assert_close(explicit, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fused.double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_gradients_agree_between_the_paths(c):
    q, k, v, mask = tensors(c)
    grads = []
    for fused in (True, False):
        leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
        out, _ = attend(*leaves, causal=c["causal"], mask=mask, scale=c["scale"], fused=fused)
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_folding_a_decoding_step_stacks_each_groups_queries_as_rows():
    q = torch.randn(2, 6, 1, 8)  # 6 query heads over 2 K/V heads
    folded = fold_grouped_queries(q, 2)
    assert folded.shape == (2, 2, 3, 8)
    torch.testing.assert_close(folded[:, 1, 2], q[:, 5, 0])  # head 5 is row 2 of group 1
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    context = F.scaled_dot_product_attention(folded, k, v).reshape(2, 6, 1, 8)
    torch.testing.assert_close(context, by_hand(q, k, v), atol=1e-5, rtol=1e-5)


def test_padding_unequal_heads_changes_no_score():
    q, k, v = torch.randn(1, 2, 5, 12), torch.randn(1, 2, 5, 12), torch.randn(1, 2, 5, 8)
    pq, pk, pv = pad_to_one_head_dim(q, k, v)
    assert pq.shape[-1] == pk.shape[-1] == pv.shape[-1] == 12 and torch.equal(pv[..., 8:], torch.zeros(1, 2, 5, 4))
    padded = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, scale=12 ** -0.5)[..., :8]
    torch.testing.assert_close(padded, by_hand(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_causal_mask_is_bottom_right_aligned():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_kernel_errors():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ConfigError, match="query heads=3 is not a multiple of key/value heads=2"):
        attend(q, torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ConfigError, match="q_len <= k_len"):
        attend(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), causal=True)
