"""Bahdanau's additive attention: a hand computation, rows summing to 1, masks, recording."""

import pytest
import torch

from attnlab.attention import AdditiveAttention, attend, attend_scores, record_attention
from attnlab.errors import ConfigError


def test_weights_and_context_match_a_hand_computation():
    torch.manual_seed(3)
    attn = AdditiveAttention(query_dim=5, key_dim=4, attn_dim=6)
    s = torch.randn(2, 3, 5)  # (B, Tq, query_dim): decoder states
    h = torch.randn(2, 7, 4)  # (B, Tk, key_dim): encoder states
    with record_attention(attn) as rec:
        context = attn(s, h)
    W, U, v = attn.W_a.weight, attn.U_a.weight, attn.v_a.weight[0]  # (A, 5), (A, 4), (A,)
    for b in range(2):
        for i in range(3):
            e = torch.stack([v @ torch.tanh(W @ s[b, i] + U @ h[b, j]) for j in range(7)])  # (Tk,)
            alpha = torch.exp(e) / torch.exp(e).sum()
            torch.testing.assert_close(rec.weights[0][b, 0, i], alpha)
            torch.testing.assert_close(context[b, i], (alpha[:, None] * h[b]).sum(0))
    assert rec.weights[0].shape == (2, 1, 3, 7)
    torch.testing.assert_close(rec.weights[0].sum(-1), torch.ones(2, 1, 3))


def test_masked_inputs_get_no_weight_and_do_not_change_the_context():
    torch.manual_seed(0)
    attn = AdditiveAttention(4, 4, 8)
    s, h = torch.randn(2, 1, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    noisy = h.clone()
    noisy[0, 3:] = 100.0  # padding content must not matter
    with record_attention(attn) as rec:
        out = attn(s, noisy, key_mask=mask)
    assert torch.all(rec.weights[0][0, 0, 0, 3:] == 0)
    torch.testing.assert_close(rec.weights[0].sum(-1), torch.ones(2, 1, 1))
    torch.testing.assert_close(out[0], attn(s[:1], h[:1, :3])[0])
    projected = attn.project_keys(noisy)  # computed once, reused at every decoding step
    torch.testing.assert_close(attn(s, noisy, key_mask=mask, projected_keys=projected), out)


def test_attend_scores_is_the_kernels_second_half():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 5)  # grouped K/V heads
    mask = torch.rand(2, 1, 3, 6) > 0.3
    mask[..., 0] = True
    expected, weights = attend(q, k, v, mask=mask, need_weights=True)
    scores = (q.view(2, 2, 2, 3, 8) @ k.unsqueeze(2).transpose(-2, -1)).view(2, 4, 3, 6) / 8 ** 0.5
    context, got = attend_scores(scores, v, mask=mask)
    torch.testing.assert_close(context, expected)
    torch.testing.assert_close(got, weights)


def test_bad_inputs_are_named():
    attn = AdditiveAttention(4, 3, 2)
    with pytest.raises(ConfigError, match="expected d_in=3"):
        attn(torch.randn(1, 1, 4), torch.randn(1, 5, 4))
    with pytest.raises(ConfigError, match="key_mask"):
        attn(torch.randn(1, 1, 4), torch.randn(1, 5, 3), key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="attn_dim=0"):
        AdditiveAttention(4, 3, 0)
