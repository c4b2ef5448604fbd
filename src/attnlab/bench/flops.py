"""Model FLOPs: the matrix multiplications an attention block or a GPT needs, counted by hand.

One multiply-add is 2 FLOPs. Norms, softmax, activations and embedding lookups are left out (they
are a few percent and not matmuls), as in the PaLM / nanoGPT MFU convention. With ``causal=True``
only the query-key pairs a causal mask keeps are counted (a causal kernel skips the rest), so a
kernel that computes the full (T, T) scores and masks them afterwards does extra, uncounted work.
Backward costs twice the forward: a training step is 3x the forward FLOPs.
"""

from __future__ import annotations

from attnlab import _checks


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """FLOPs of x (tokens, d_in) @ W (d_in, d_out)."""
    return 2 * tokens * d_in * d_out


def attention_pairs(q_len: int, k_len: int, causal: bool) -> int:
    """Query-key pairs one head scores; causal queries are the last q_len of k_len positions."""
    if not causal:
        return q_len * k_len
    past = k_len - q_len  # every query sees all earlier (cached) keys, then a triangle
    return q_len * past + q_len * (q_len + 1) // 2


def attention_core_flops(batch: int, n_heads: int, q_len: int, k_len: int, qk_dim: int, v_dim: int,
                         causal: bool = True) -> int:
    """softmax(Q Kᵀ) V: scores (qk_dim per pair) plus the weighted sum of values (v_dim per pair)."""
    return 2 * batch * n_heads * attention_pairs(q_len, k_len, causal) * (qk_dim + v_dim)


def gqa_flops(batch: int, seq: int, d_model: int, n_heads: int, n_kv_heads: int | None = None,
              head_dim: int | None = None, *, causal: bool = True, past: int = 0) -> int:
    """Forward FLOPs of a GroupedQueryAttention block (MHA/GQA/MQA) on ``seq`` new tokens after
    ``past`` cached ones: Q, K, V and output projections plus the attention itself."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    head_dim = d_model // n_heads if head_dim is None else head_dim
    tokens = batch * seq
    proj = linear_flops(tokens, d_model, (n_heads + 2 * n_kv_heads) * head_dim)
    proj += linear_flops(tokens, n_heads * head_dim, d_model)
    return proj + attention_core_flops(batch, n_heads, seq, past + seq, head_dim, head_dim, causal)


def mla_flops(batch: int, seq: int, d_model: int, n_heads: int, *, q_lora_rank: int = 0, kv_lora_rank: int = 512,
              qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64, v_head_dim: int = 128, mode: str = "naive",
              causal: bool = True, past: int = 0) -> int:
    """Forward FLOPs of MultiHeadLatentAttention for ``seq`` new tokens after ``past`` cached ones.

    naive: up-projects the new tokens' latents into per-head K/V, attends with head dims
    (nope + rope, v). absorbed: maps each query into the latent (W_UK), attends over the latent
    with key dim kv_lora_rank + rope and value dim kv_lora_rank, then maps back per head (W_UV).
    """
    _checks.one_of("mode", mode, ("naive", "absorbed"))
    tokens, qk_dim = batch * seq, qk_nope_head_dim + qk_rope_head_dim
    if q_lora_rank:
        flops = linear_flops(tokens, d_model, q_lora_rank) + linear_flops(tokens, q_lora_rank, n_heads * qk_dim)
    else:
        flops = linear_flops(tokens, d_model, n_heads * qk_dim)
    flops += linear_flops(tokens, d_model, kv_lora_rank + qk_rope_head_dim)  # wkv_a
    flops += linear_flops(tokens, n_heads * v_head_dim, d_model)  # wo
    if mode == "naive":
        flops += linear_flops(tokens, kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim))  # wkv_b
        return flops + attention_core_flops(batch, n_heads, seq, past + seq, qk_dim, v_head_dim, causal)
    flops += linear_flops(tokens * n_heads, qk_nope_head_dim, kv_lora_rank)  # q_nope @ W_UK
    flops += linear_flops(tokens * n_heads, kv_lora_rank, v_head_dim)  # context @ W_UVᵀ
    return flops + attention_core_flops(
        batch, n_heads, seq, past + seq, kv_lora_rank + qk_rope_head_dim, kv_lora_rank, causal)


def swiglu_flops_per_token(d_model: int, hidden: int) -> int:
    """Forward FLOPs of one token through a SwiGLU FFN: three (d_model × hidden) matmuls."""
    return 3 * linear_flops(1, d_model, hidden)


def moe_flops_per_token(d_model: int, n_routed_experts: int, n_activated_experts: int, n_shared_experts: int,
                        expert_hidden: int) -> int:
    """Forward FLOPs of one token through an MoE layer: the router plus the top-k routed and the
    shared SwiGLU experts (the experts a token is not routed to cost it nothing)."""
    return (linear_flops(1, d_model, n_routed_experts)
            + (n_activated_experts + n_shared_experts) * swiglu_flops_per_token(d_model, expert_hidden))


def ffn_flops_per_token(cfg, moe_layer: bool) -> int:
    """Forward FLOPs of one layer's FFN for one token of a GPTConfig."""
    if moe_layer:
        return moe_flops_per_token(cfg.d_model, cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_shared_experts,
                                   cfg.expert_hidden)
    if cfg.activation == "swiglu":
        return swiglu_flops_per_token(cfg.d_model, cfg.ffn_hidden)
    return 2 * linear_flops(1, cfg.d_model, cfg.ffn_hidden)


def gpt_forward_flops(cfg, batch: int, seq: int, *, causal: bool = True) -> int:
    """Forward FLOPs of a GPT (attnlab.models.gpt.GPTConfig) on a (batch, seq) block, LM head included."""
    tokens = batch * seq
    if cfg.attention == "mla":
        attn = mla_flops(batch, seq, cfg.d_model, cfg.n_head, q_lora_rank=cfg.q_lora_rank,
                         kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                         qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, mode=cfg.mla_mode,
                         causal=causal)
    else:
        attn = gqa_flops(batch, seq, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, causal=causal)
    moe_layers = 0 if cfg.ffn == "dense" else max(0, cfg.n_layer - cfg.n_dense_layers)
    ffn = tokens * (moe_layers * ffn_flops_per_token(cfg, True)
                    + (cfg.n_layer - moe_layers) * ffn_flops_per_token(cfg, False))
    head = linear_flops(tokens, cfg.d_model, cfg.vocab_size)
    return cfg.n_layer * attn + ffn + head


def gpt_train_flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward) at sequence length seq."""
    return 3 * gpt_forward_flops(cfg, 1, seq) / seq

