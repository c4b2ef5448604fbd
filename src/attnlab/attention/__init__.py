"""Attention modules: the lecture path, the kernel, and recording of per-head weights."""

from attnlab.attention.kernel import attend, causal_mask
from attnlab.attention.lecture import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    simple_self_attention,
)
from attnlab.attention.record import Recording, RecordsAttention, record_attention

__all__ = [
    "attend",
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
]
