"""Cross-attention ≡ a hand computation (both kernel paths), its memory K/V projected once per input,
and the encoder–decoder: cached decoding ≡ uncached, padding never changes the real tokens' outputs."""

import math

import pytest
import torch

from attnlab.attention import record_attention
from attnlab.attention.cross import CrossAttention
from attnlab.errors import ConfigError
from attnlab.models.base import load_pretrained
from attnlab.models.encdec import EncDecConfig, EncoderDecoder, sinusoidal_positions

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(attn: CrossAttention, x, memory, mask):
    """Multi-head cross-attention written out per head with plain tensor ops."""
    heads = []
    for h in range(attn.n_heads):
        rows = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        q = x @ attn.q_proj.weight[rows].T  # (B, Tq, hs)
        k = memory @ attn.k_proj.weight[rows].T  # (B, Tk, hs)
        v = memory @ attn.v_proj.weight[rows].T
        scores = q @ k.transpose(1, 2) / math.sqrt(attn.head_dim)  # (B, Tq, Tk): no causal mask
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_through_the_kernel_equals_a_hand_computation(fused):
    torch.manual_seed(0)
    attn = CrossAttention(16, 4, memory_dim=12)
    attn.fused = fused
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    torch.testing.assert_close(attn(x, memory, memory_mask=mask), reference(attn, x, memory, mask), atol=1e-5, rtol=1e-5)
    with record_attention(attn) as rec:
        attn(x, memory, memory_mask=mask)
    weights = rec.weights[0]  # (B, heads, Tq, Tk)
    assert weights.shape == (3, 4, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 5))
    assert torch.all(weights[1, :, :, 4:] == 0) and torch.all(weights[2, :, :, 0] == 1)


def test_the_memory_is_projected_once_per_input_and_then_read_from_the_cache():
    torch.manual_seed(0)
    attn = CrossAttention(8, 2)
    calls = []
    attn.k_proj.register_forward_hook(lambda *args: calls.append(1))
    x, memory = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    full = attn(x, memory)
    cache = attn.new_cache(2, 4)
    calls.clear()
    steps = [attn(x[:, t:t + 1], memory if t == 0 else None, cache=cache) for t in range(6)]
    assert len(calls) == 1 and cache.length == 4  # the memory's 4 keys, stored once
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="memory=None"):
        attn(x, None)
    with pytest.raises(ConfigError, match="memory_mask"):
        attn(x, memory, memory_mask=torch.ones(2, 5, dtype=torch.bool))


def tiny_model() -> EncoderDecoder:
    torch.manual_seed(2)
    return EncoderDecoder(EncDecConfig(vocab_size=11, d_model=16, n_head=2, n_encoder_layer=2, n_decoder_layer=2)).eval()


def padded_batch():
    src = torch.tensor([[4, 5, 6, 7, 8, 9], [5, 3, 9, 0, 0, 0], [10, 4, 0, 0, 0, 0]])  # 0 = pad_id
    tgt = torch.tensor([[1, 9, 8, 7, 6], [1, 9, 3, 5, 2], [1, 4, 10, 2, 2]])
    return src, tgt


@pytest.mark.parametrize("fused", [True, False])
def test_cached_decoding_equals_decoding_the_whole_target_at_once(fused):
    model = tiny_model()
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    src, tgt = padded_batch()
    full, _ = model(src, tgt)
    state = model.start(src, max_len=8)
    steps = [model.step(state, tgt[:, :2])] + [model.step(state, tgt[:, t:t + 1]) for t in range(2, 5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert all(cross.length == 6 and own.length == 5 for own, cross in state.caches)


def test_padding_in_the_encoder_never_changes_the_real_tokens_outputs():
    model = tiny_model()
    src, tgt = padded_batch()
    logits, _ = model(src, tgt)
    memory, mask = model.encode(src)
    for b, length in enumerate((6, 3, 2)):
        alone, _ = model(src[b:b + 1, :length], tgt[b:b + 1])  # the same input without any padding
        torch.testing.assert_close(logits[b:b + 1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(memory[b, :length], model.encode(src[b:b + 1, :length])[0][0], atol=1e-5, rtol=1e-5)
    assert mask.sum(1).tolist() == [6, 3, 2]
    longer = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # four more pad tokens for everyone
    torch.testing.assert_close(model(longer, tgt)[0], logits, atol=1e-5, rtol=1e-5)


def test_future_targets_never_change_earlier_logits_and_save_load_is_exact(tmp_path):
    model = tiny_model()
    src, tgt = padded_batch()
    changed = tgt.clone()
    changed[:, 3:] = 7
    torch.testing.assert_close(model(src, changed)[0][:, :3], model(src, tgt)[0][:, :3])
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, EncoderDecoder)
    torch.testing.assert_close(loaded(src, tgt)[0], model(src, tgt)[0], rtol=0, atol=0)


def test_sinusoidal_positions_follow_the_paper():
    pe = sinusoidal_positions(50, 8)
    assert pe[0, 0::2].abs().max() == 0 and torch.all(pe[0, 1::2] == 1)
    torch.testing.assert_close(pe[7, 2], torch.tensor(math.sin(7 / 10000 ** (2 / 8))))
    torch.testing.assert_close(pe[7, 3], torch.tensor(math.cos(7 / 10000 ** (2 / 8))))
    torch.testing.assert_close(sinusoidal_positions(10, 8, start=40), pe[40:])
    with pytest.raises(ConfigError, match="pad_id=11"):
        EncDecConfig(vocab_size=11, pad_id=11)
