"""The one place where softmax(Q Kᵀ · scale) V is computed.

Two paths give the same numbers:
- explicit: scores, mask, softmax, dropout, weighted sum — returns the weights too;
- fused: ``F.scaled_dot_product_attention``, which never materialises the (T, T) weights.

Every attention module calls :func:`attend`, so a fix here lands everywhere.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from attnlab.errors import ConfigError


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where a query may look.

    Queries are the *last* q_len positions of the k_len keys (bottom-right aligned), which is
    what a KV cache needs: query i sits at absolute position k_len - q_len + i.
    """
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    return k_pos <= q_pos


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q over (k, v). Returns (context, weights or None).

    Shapes: q (B, H, Tq, Dk), k (B, Hkv, Tk, Dk), v (B, Hkv, Tk, Dv) with H a multiple of Hkv
    (grouped-query attention shares each K/V head among H // Hkv query heads, no copies made);
    context (B, H, Tq, Dv); weights (B, H, Tq, Tk) before dropout, rows summing to 1.

    mask: boolean, broadcastable to (B, H, Tq, Tk), True where attention is allowed.
    causal: queries are the last Tq of Tk positions and see only keys at or before their own.
    scale: defaults to 1/sqrt(Dk). dropout_p: applied to the weights (pass 0.0 in eval).
    The explicit path runs when weights are requested or ``fused=False``.
    """
    n_heads, n_kv_heads = q.size(1), k.size(1)
    if n_heads % n_kv_heads != 0:
        raise ConfigError(
            f"query heads={n_heads} is not a multiple of key/value heads={n_kv_heads}"
        )
    q_len, k_len = q.size(-2), k.size(-2)
    if causal and q_len > k_len:
        raise ConfigError(f"causal attention needs q_len <= k_len, got {q_len} > {k_len}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))

    if fused and not need_weights:
        return _fused(q, k, v, causal, mask, dropout_p, scale), None
    return _explicit(q, k, v, causal, mask, dropout_p, scale)


def _fused(q, k, v, causal, mask, dropout_p, scale):
    batch, n_heads, q_len, _ = q.shape
    n_kv_heads, k_len, v_dim = k.size(1), k.size(-2), v.size(-1)
    is_causal = False
    if causal and q_len == k_len and mask is None:
        is_causal = True
    elif causal and q_len > 1:
        allowed = causal_mask(q_len, k_len, q.device)
        mask = allowed if mask is None else mask & allowed
    folded = n_heads != n_kv_heads and q_len == 1 and (mask is None or mask.dim() < 3 or mask.size(-3) == 1)
    if folded:
        q, is_causal = fold_grouped_queries(q, n_kv_heads), False  # a single query sees every key
    if q.size(-1) != v_dim and q_len > 1 and q.device.type == "cpu":
        q, k, v = pad_to_one_head_dim(q, k, v)
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=q.size(1) != k.size(1),
    )
    if context.size(-1) != v_dim:
        context = context[..., :v_dim]  # drop the padding columns
    return context.reshape(batch, n_heads, q_len, v_dim) if folded else context


def fold_grouped_queries(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """CPU workaround 1, for a decoding step (one query per head) with grouped K/V heads: the
    queries of a group become the rows of one query block, q (B, H, 1, D) -> (B, Hkv, H/Hkv, D).
    Each K/V head is then read once, not once per query head (SDPA's grouped-query path on CPU
    was ~100× slower at 4k context), and never copied per head. Reshape the context back to
    (B, H, 1, Dv) afterwards."""
    batch, n_heads, _, dim = q.shape
    return q.reshape(batch, n_kv_heads, n_heads // n_kv_heads, dim)


def pad_to_one_head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """CPU workaround 2, for Q/K and V heads of different widths (MLA: qk 192, v 128): PyTorch's
    fused CPU kernel needs one head size, else SDPA falls back to its math path, which forms the
    (Tq, Tk) scores. Zero columns change no score (pass the scale explicitly: it must not follow
    the padded width) and the first v_dim context columns are the real ones."""
    width = max(q.size(-1), v.size(-1))
    return tuple(t if t.size(-1) == width else F.pad(t, (0, width - t.size(-1))) for t in (q, k, v))


@functools.lru_cache(maxsize=16)
def _causal_bias(q_len: int, k_len: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask (group·q_len, k_len): 0 where a query may look, -inf where not, the rows
    repeated for each query head of a group. Made once per shape: training asks for it every layer."""
    allowed = causal_mask(q_len, k_len, device).repeat(group, 1)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def _explicit(q, k, v, causal, mask, dropout_p, scale):
    batch, n_heads, q_len, dim = q.shape
    n_kv_heads, k_len = k.size(1), k.size(-2)
    group = n_heads // n_kv_heads
    # The query heads that share a K/V head become one block of rows: (B·Hkv, G·Tq, D) against (B·Hkv, D, Tk).
    qg = q.reshape(batch * n_kv_heads, group * q_len, dim)
    kt = k.reshape(batch * n_kv_heads, k_len, dim).transpose(1, 2)
    if causal:  # scale, scores and mask in one call: scale·(q kᵀ) + bias
        bias = _causal_bias(q_len, k_len, group, torch.promote_types(q.dtype, k.dtype), q.device)
        scores = torch.baddbmm(bias, qg, kt, alpha=scale)
    else:
        scores = torch.bmm(qg, kt) * scale
    scores = scores.view(batch, n_heads, q_len, k_len)
    return attend_scores(scores, v, mask=mask, dropout_p=dropout_p)


def attend_scores(scores: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax of ready-made scores (B, H, Tq, Tk) and the weighted sum of v (B, Hkv, Tk, Dv):
    the explicit path's second half, also for scores that are not a dot product (Bahdanau's
    additive score). Returns (context (B, H, Tq, Dv), weights (B, H, Tq, Tk) before dropout)."""
    batch, n_heads, q_len, k_len = scores.shape
    n_kv_heads = v.size(1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    dropped = F.dropout(weights, dropout_p, training=True) if dropout_p > 0 else weights
    dropped = dropped.reshape(batch, n_kv_heads, n_heads // n_kv_heads, q_len, k_len)
    context = (dropped @ v.unsqueeze(2)).reshape(batch, n_heads, q_len, v.size(-1))
    return context, weights
