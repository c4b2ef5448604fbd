"""attnlab: LLM attention from the first dot product to DeepSeek's MLA — see it, prove it,
compare it, train it."""

from attnlab.attention import (
    CausalAttention,
    GroupedQueryAttention,
    KVCache,
    LatentKVCache,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    MultiHeadLatentAttention,
    RotaryEmbedding,
    SelfAttentionV1,
    SelfAttentionV2,
    record_attention,
    simple_self_attention,
)
from attnlab.errors import ConfigError, InputTypeError, UserError

__version__ = "0.1.0"

__all__ = [
    "simple_self_attention",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "record_attention",
    "GroupedQueryAttention",
    "MultiHeadLatentAttention",
    "RotaryEmbedding",
    "KVCache",
    "LatentKVCache",
    "UserError",
    "ConfigError",
    "InputTypeError",
]
