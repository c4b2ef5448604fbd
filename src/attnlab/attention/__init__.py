"""Attention modules: the lecture path, the kernel, and recording of per-head weights.
(HF transformers attention modules convert to these with :func:`attnlab.hf.from_hf`.)"""

from attnlab.attention.additive import AdditiveAttention
from attnlab.attention.cache import KVCache, LatentKVCache
from attnlab.attention.cross import CrossAttention
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.attention.head_mask import collect_head_means, set_head_mask
from attnlab.attention.kernel import attend, attend_scores, causal_mask
from attnlab.attention.lecture import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    simple_self_attention,
)
from attnlab.attention.mla import MultiHeadLatentAttention
from attnlab.attention.record import Recording, RecordsAttention, record_attention
from attnlab.attention.rope import RotaryEmbedding, apply_rope

__all__ = [
    "attend",
    "attend_scores",
    "causal_mask",
    "simple_self_attention",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "Recording",
    "RecordsAttention",
    "record_attention",
    "set_head_mask",
    "collect_head_means",
    "GroupedQueryAttention",
    "MultiHeadLatentAttention",
    "RotaryEmbedding",
    "apply_rope",
    "KVCache",
    "LatentKVCache",
    "AdditiveAttention",
    "CrossAttention",
]
