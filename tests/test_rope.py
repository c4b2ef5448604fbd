import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab.attention.rope import RotaryEmbedding, apply_rope
from attnlab.errors import ConfigError, InputTypeError


def _rotate_pairs_by_hand(x, positions, theta, interleaved):
    """Per-pair 2-D rotation written as a loop over features, the definition of RoPE."""
    dim = x.size(-1)
    out = torch.empty_like(x)
    for i in range(dim // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
        angle = positions.double()[:, None] * theta ** (-2 * i / dim)  # (T, 1)
        c, s = torch.cos(angle).squeeze(-1), torch.sin(angle).squeeze(-1)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_is_the_pairwise_rotation(interleaved):
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 40])
    rope = RotaryEmbedding(8, theta=500.0, interleaved=interleaved)
    expected = _rotate_pairs_by_hand(x, positions, 500.0, interleaved)
    torch.testing.assert_close(rope(x, positions), expected, atol=1e-5, rtol=1e-5)


def test_conventions_differ_by_a_feature_permutation():
    """Interleaved RoPE on x equals rotate-half RoPE on x with pairs (2i, 2i+1) moved to (i, i+dim/2)."""
    x = torch.randn(1, 2, 6, 8)
    pos = torch.arange(6)
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    inter = RotaryEmbedding(8, interleaved=True)(x, pos)
    half = RotaryEmbedding(8, interleaved=False)(x[..., perm], pos)
    torch.testing.assert_close(inter[..., perm], half)


@settings(max_examples=25, deadline=None)
@given(shift=st.integers(0, 5000), interleaved=st.booleans(), half_dim=st.integers(1, 8))
def test_scores_depend_only_on_relative_position(shift, interleaved, half_dim):
    dim = 2 * half_dim
    rope = RotaryEmbedding(dim, theta=10000.0, interleaved=interleaved)
    q, k = torch.randn(1, 2, 6, dim, dtype=torch.float64), torch.randn(1, 2, 6, dim, dtype=torch.float64)
    pos = torch.arange(6)
    scores = rope(q, pos) @ rope(k, pos).transpose(-2, -1)
    shifted = rope(q, pos + shift) @ rope(k, pos + shift).transpose(-2, -1)
    torch.testing.assert_close(shifted, scores, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(rope(q, pos + 1), rope(q, pos))  # positions do change the vectors


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_a_gpt_makes_its_rope_tables_once_and_never_reads_the_device_while_decoding(monkeypatch, attention):
    """No int()/item()/tolist() in the forward pass (each is a host sync per layer per step on CUDA)."""
    from attnlab.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=3, n_head=4, n_kv_head=2 if attention == "gqa" else None,
                          d_model=32, attention=attention, positions="rope", kv_lora_rank=8, qk_nope_head_dim=8,
                          qk_rope_head_dim=4, v_head_dim=8, mla_mode="absorbed")).eval()
    built = []
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            monkeypatch.setattr(module, "_build", lambda *a, m=module: built.append(m))
    idx = torch.randint(0, 11, (2, 9))
    caches = model.new_caches(2, 16)
    with torch.no_grad():
        model(idx[:, :8], caches=caches)  # prefill

        def sync(*args, **kwargs):
            raise AssertionError("the forward pass read a tensor on the host")

        for name in ("__int__", "item", "tolist", "__bool__"):
            monkeypatch.setattr(torch.Tensor, name, sync)
        model(idx[:, 8:], caches=caches)  # one decoding step
    assert built == []  # the model's table, made at init for block_size, served every layer and call


def test_batched_positions_and_growth():
    rope = RotaryEmbedding(4)
    x = torch.randn(2, 1, 3, 4)
    pos = torch.tensor([[0, 1, 2], [1000, 1001, 1002]])  # beyond the first table: grows
    out = rope(x, pos)
    torch.testing.assert_close(out[0:1], rope(x[0:1], pos[0]))
    torch.testing.assert_close(out[1:2], rope(x[1:2], pos[1]))


def test_keeps_dtype_and_computes_angles_in_float32():
    rope = RotaryEmbedding(64, theta=1e5).to(torch.bfloat16)
    x = torch.randn(1, 1, 4, 64)
    pos = torch.tensor([5000, 5001, 5002, 5003])
    out = rope(x.bfloat16(), pos)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rope(x, pos), atol=0.05, rtol=0.02)


def test_apply_rope_with_explicit_tables():
    x = torch.randn(3, 4)
    angle = torch.full((3, 2), math.pi / 2)
    out = apply_rope(x, angle.cos(), angle.sin(), interleaved=True)
    torch.testing.assert_close(out[:, 0], -x[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1], x[:, 0], atol=1e-6, rtol=0)


def test_errors_name_the_values():
    with pytest.raises(ConfigError, match="dim=7"):
        RotaryEmbedding(7)
    with pytest.raises(ConfigError, match="rope_theta=0"):
        RotaryEmbedding(8, theta=0)
    rope = RotaryEmbedding(8)
    with pytest.raises(InputTypeError, match="integer tensor"):
        rope(torch.randn(1, 1, 2, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ConfigError, match=r"\(3,\)"):
        rope(torch.randn(1, 1, 2, 8), torch.arange(3))
    with pytest.raises(InputTypeError, match="dim=8"):
        rope(torch.randn(1, 1, 2, 6), torch.arange(2))
