import pytest
import torch

from attnlab.attention.cache import KVCache, LatentKVCache
from attnlab.errors import ConfigError, InputTypeError


def test_kv_cache_prefill_decode_chunk_returns_everything_written():
    cache = KVCache(2, 3, 10, 4, 5)
    ks, vs = [], []
    for t_new in (4, 1, 1, 3):
        k, v = torch.randn(2, 3, t_new, 4), torch.randn(2, 3, t_new, 5)
        ks.append(k), vs.append(v)
        k_all, v_all = cache.update(k, v)
        torch.testing.assert_close(k_all, torch.cat(ks, dim=2), rtol=0, atol=0)
        torch.testing.assert_close(v_all, torch.cat(vs, dim=2), rtol=0, atol=0)
    assert cache.length == 9
    assert k_all.data_ptr() == cache.k.data_ptr()  # a view of the preallocated storage, no copy


def test_kv_cache_bytes():
    cache = KVCache(2, 3, 16, 4, 5, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == 3 * (4 + 5) * 2
    cache.update(torch.zeros(2, 3, 7, 4, dtype=torch.bfloat16), torch.zeros(2, 3, 7, 5, dtype=torch.bfloat16))
    assert cache.bytes() == 2 * 7 * cache.bytes_per_token()
    measured = sum(t[:, :, : cache.length].numel() * t.element_size() for t in (cache.k, cache.v))
    assert cache.bytes() == measured
    cache.reset()
    assert cache.length == 0 and cache.bytes() == 0
    assert KVCache(1, 2, 4, 8).v_dim == 8  # v_dim defaults to k_dim


def test_latent_cache():
    cache = LatentKVCache(2, 8, 512, 64)
    assert cache.bytes_per_token() == 576 * 4
    c1, p1 = torch.randn(2, 5, 512), torch.randn(2, 5, 64)
    c2, p2 = torch.randn(2, 1, 512), torch.randn(2, 1, 64)
    cache.update(c1, p1)
    c_all, p_all = cache.update(c2, p2)
    torch.testing.assert_close(c_all, torch.cat([c1, c2], 1), rtol=0, atol=0)
    torch.testing.assert_close(p_all, torch.cat([p1, p2], 1), rtol=0, atol=0)
    assert cache.bytes() == 2 * 6 * 576 * 4
    cache.reset()
    assert cache.length == 0


def test_overflow_names_length_t_new_and_max_len():
    cache = KVCache(1, 1, 5, 2)
    cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    with pytest.raises(ConfigError, match=r"length=4 \+ T_new=2 > max_len=5"):
        cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert cache.length == 4  # a refused update changes nothing
    latent = LatentKVCache(1, 3, 4, 2)
    with pytest.raises(ConfigError, match=r"length=0 \+ T_new=4 > max_len=3"):
        latent.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 2))


@pytest.mark.parametrize(
    "k, v, error, pattern",
    [
        (torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4), ConfigError, r"shape \(3, 2, 1, 4\).*B=2"),
        (torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), ConfigError, r"Hkv=2"),
        (torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 4), ConfigError, r"k_dim=4"),
        (torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 3), ConfigError, r"v_dim=4"),
        (torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 2, 4), ConfigError, r"T_new=1.*2"),
        (torch.zeros(2, 2, 1, 4, dtype=torch.float64), torch.zeros(2, 2, 1, 4), InputTypeError, r"float64.*float32"),
        (torch.zeros(2, 2, 1, 4, device="meta"), torch.zeros(2, 2, 1, 4), InputTypeError, r"device meta.*cpu"),
        ([0.0], torch.zeros(2, 2, 1, 4), InputTypeError, r"torch.Tensor"),
    ],
)
def test_kv_cache_refuses_other_shapes_dtypes_devices(k, v, error, pattern):
    cache = KVCache(2, 2, 8, 4)
    with pytest.raises(error, match=pattern):
        cache.update(k, v)


def test_latent_cache_refuses_other_dims():
    cache = LatentKVCache(1, 8, 16, 4)
    with pytest.raises(ConfigError, match="kv_lora_rank=16"):
        cache.update(torch.zeros(1, 1, 8), torch.zeros(1, 1, 4))
    with pytest.raises(ConfigError, match="qk_rope_head_dim=4"):
        cache.update(torch.zeros(1, 1, 16), torch.zeros(1, 1, 2))


def test_constructor_errors():
    with pytest.raises(ConfigError, match="max_len=0"):
        KVCache(1, 1, 0, 4)
    with pytest.raises(ConfigError, match="n_kv_heads=-1"):
        KVCache(1, -1, 4, 4)
    with pytest.raises(InputTypeError, match="dtype"):
        LatentKVCache(1, 4, 4, 4, dtype=torch.int64)
