"""A decoder-only transformer whose attention, FFN, positions and norm are chosen by config.

One ``GPTConfig`` covers nanoGPT (learned positions, LayerNorm, GELU, MHA), Llama-style models
such as SmolLM2-135M (RoPE, RMSNorm, SwiGLU, GQA, tied embeddings, no biases), DeepSeek-style
MLA + MoE, and the lecture's wrapper of single heads for teaching. Pre-norm residual blocks:
x + attn(norm1(x)), then x + ffn(norm2(x)).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from attnlab import _checks
from attnlab.attention.cache import KVCache
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.attention.head_mask import HeadMaskMixin
from attnlab.attention.lecture import MultiHeadAttentionWrapper
from attnlab.attention.mla import MultiHeadLatentAttention, check_rope_pairs
from attnlab.attention.rope import RotaryEmbedding, check_rope_scaling, default_positions
from attnlab.errors import ConfigError, InputTypeError
from attnlab.ffn import MLP, SCORE_FUNCS, MoE, SwiGLU
from attnlab.models.base import SaveLoadMixin, register_model
from attnlab.norm import RMSNorm
from attnlab.options import check_choices, option

ATTENTIONS = ("mha", "gqa", "mqa", "mla", "wrapper")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
MODEL_TYPE = "gpt"


@dataclass
class GPTConfig:
    """Everything needed to rebuild a GPT; saved as config.json next to the weights. Fields left at
    None are derived in ``__post_init__``, so every field of a built config holds its real value."""

    vocab_size: int = option(65, "token ids the embedding and lm_head cover", flag=False)
    block_size: int = option(256, "longest sequence the model is trained (and allowed) to see")
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "query heads per attention layer")
    n_kv_head: int | None = option(None, "K/V heads; None: n_head for mha/gqa, 1 for mqa")
    d_model: int = option(128, "width of the residual stream")
    head_dim: int | None = option(None, "dims per head; None: d_model // n_head")
    attention: str = option("mha", "the attention variant; wrapper: the lecture's stack of single heads",
                            choices=ATTENTIONS)
    # MLA (DeepSeek-V2/V3 names); MLA always carries its own decoupled RoPE.
    q_lora_rank: int = option(0, "MLA query compression rank; 0: queries are not compressed")
    kv_lora_rank: int = option(64, "MLA latent c_kv width: what the absorbed cache holds per token")
    qk_nope_head_dim: int = option(32, "MLA per-head query/key dims without RoPE (0: all of them rotate)")
    qk_rope_head_dim: int = option(16, "MLA per-head query/key dims with RoPE (one RoPE key shared by all heads)")
    v_head_dim: int = option(32, "MLA per-head value dims")
    mla_rope_heads: int = option(1, "MLA RoPE keys per token: 1 shares one across heads (DeepSeek); a model "
                                    "converted from GQA keeps one per original K/V head")
    mla_rope_pairs: list | None = option(None, "MLA, per layer and RoPE key head: the frequency pairs of a head_dim-wide "
                                               "RoPE its qk_rope dims turn by (a converted model keeps its source's); "
                                               "None: the first pairs of a qk_rope_head_dim-wide RoPE", flag=False)
    mla_kv_norm: bool = option(True, "MLA RMSNorm on the latent c_kv (a converted model has none, to stay exact)")
    mla_mode: str = option("naive", "naive: per-head K/V from c_kv; absorbed: weights folded, only c_kv cached",
                           choices=("naive", "absorbed"))
    ffn: str = option("dense", "one MLP per block, or a mixture of experts", choices=("dense", "moe"))
    activation: str = option("gelu", "activation of the dense FFN (gelu_tanh: GPT-2's tanh approximation)",
                             choices=ACTIVATIONS)
    ffn_hidden: int | None = option(None, "dense FFN width; None: 4 * d_model (gelu) or 8/3 * d_model rounded up "
                                          "to 8 (swiglu)")
    # MoE (DeepSeek-V3 names); every layer from n_dense_layers on is an MoE layer.
    n_routed_experts: int = option(8, "experts the router chooses from")
    n_activated_experts: int = option(2, "routed experts each token uses (top-k)")
    n_shared_experts: int = option(0, "experts every token always uses")
    expert_hidden: int | None = option(None, "width of each expert; None: ffn_hidden // n_activated_experts")
    n_dense_layers: int = option(0, "leading layers that keep a dense FFN")
    score_func: str = option("softmax", "router scores (sigmoid as in DeepSeek-V3)", choices=SCORE_FUNCS)
    route_scale: float = option(1.0, "multiplier of the routed experts' weighted sum")
    n_expert_groups: int = option(1, "groups of routed experts (V3's group-limited routing)")
    n_limited_groups: int = option(1, "groups a token may route into")
    aux_loss_coef: float = option(0.01, "weight of the load-balancing loss")
    bias_update_speed: float = option(0.0, "auxiliary-loss-free balancing: router bias step per update; 0: off")
    capacity_factor: float | None = option(None, "tokens an expert takes, as a multiple of its fair share; None: all")
    positions: str = option("learned", "learned absolute embeddings or rotary (RoPE)", choices=("learned", "rope"))
    rope_theta: float = option(10000.0, "RoPE base")
    rope_interleave: bool = option(False, "pair features 2i, 2i+1 (DeepSeek) instead of i, i + dim/2 (Llama, HF)")
    rope_scaling: dict | None = option(None, "long-context RoPE frequency scaling, as HF's rope_parameters: "
                                             "{'rope_type': 'linear' or 'llama3', ...}; None: plain RoPE", flag=False)
    norm: str = option("layernorm", "the pre-norm of every block and the final norm", choices=("layernorm", "rmsnorm"))
    norm_eps: float = option(1e-5, "epsilon of the norms")
    tie_embeddings: bool = option(True, "lm_head shares the token embedding's weights")
    dropout: float = option(0.0, "on attention weights and residual branches while training")
    bias: bool = option(False, "biases in every Linear and LayerNorm")
    qkv_bias: bool | None = option(None, "biases in the Q/K/V projections (Qwen2 has them, its other Linears not); "
                                         "None: as bias")

    def __post_init__(self):
        check_choices(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "kv_lora_rank", "qk_rope_head_dim",
                     "v_head_dim", "mla_rope_heads", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                     "n_limited_groups"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("q_lora_rank", "qk_nope_head_dim", "n_shared_experts", "n_dense_layers"):
            _checks.non_negative_int(name, getattr(self, name))
        _checks.dropout_prob(self.dropout)
        _checks.positive("route_scale", self.route_scale)
        _checks.non_negative("aux_loss_coef", self.aux_loss_coef)
        _checks.non_negative("bias_update_speed", self.bias_update_speed)
        _checks.positive("norm_eps", self.norm_eps)
        _checks.real("rope_theta", self.rope_theta, low=1, low_open=True)
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.capacity_factor is not None:
            _checks.positive("capacity_factor", self.capacity_factor)
        if self.head_dim is None:
            _checks.divisible("d_model", self.d_model, "n_head", self.n_head)
            self.head_dim = self.d_model // self.n_head
        _checks.positive_int("head_dim", self.head_dim)
        if self.n_kv_head is None:
            self.n_kv_head = 1 if self.attention == "mqa" else self.n_head
        _checks.positive_int("n_kv_head", self.n_kv_head)
        if self.ffn_hidden is None:
            self.ffn_hidden = 8 * ((8 * self.d_model // 3 + 7) // 8) if self.activation == "swiglu" else 4 * self.d_model
        _checks.positive_int("ffn_hidden", self.ffn_hidden)
        if self.expert_hidden is None:
            self.expert_hidden = max(1, self.ffn_hidden // self.n_activated_experts)
        _checks.positive_int("expert_hidden", self.expert_hidden)
        kv = self.n_kv_head
        if self.attention == "mha" and kv != self.n_head:
            raise ConfigError(f"n_kv_head={kv} is not allowed with attention='mha': MHA has n_kv_head == n_head={self.n_head} (use 'gqa')")
        if self.attention == "mqa" and kv != 1:
            raise ConfigError(f"n_kv_head={kv} is not allowed with attention='mqa': MQA has one K/V head (use 'gqa')")
        if self.attention == "gqa":
            _checks.divisible("n_head", self.n_head, "n_kv_head", kv)
        if self.attention == "wrapper" and self.positions != "learned":
            raise ConfigError(
                f"positions={self.positions!r} is not allowed with attention='wrapper': "
                "the lecture's wrapper has no rotary positions, use positions='learned'"
            )
        if self.attention in ("mha", "gqa", "mqa") and self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} is odd: RoPE needs an even head_dim")
        if self.attention == "mla":
            self._check_mla()

    def _check_mla(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} is odd: RoPE rotates pairs of dimensions")
        _checks.divisible("n_head", self.n_head, "mla_rope_heads", self.mla_rope_heads)
        if self.mla_rope_pairs is None:
            return
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} is odd: mla_rope_pairs index a head_dim-wide RoPE, which needs "
                              "an even head_dim")
        if not isinstance(self.mla_rope_pairs, (list, tuple)) or len(self.mla_rope_pairs) != self.n_layer:
            raise ConfigError(f"mla_rope_pairs must hold one entry per layer (n_layer={self.n_layer}), got "
                              f"{type(self.mla_rope_pairs).__name__} of length {len(self.mla_rope_pairs)}"
                              if isinstance(self.mla_rope_pairs, (list, tuple)) else
                              f"mla_rope_pairs must be None or a list per layer, got {self.mla_rope_pairs!r}")
        self.mla_rope_pairs = [check_rope_pairs(layer, self.mla_rope_heads, self.qk_rope_head_dim, self.head_dim)
                               for layer in self.mla_rope_pairs]

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(f"model_type={model_type!r} is not a GPT config: expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config has unknown GPT fields {unknown}: allowed fields are {sorted(known)}")
        return cls(**data)


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class LectureAttention(nn.Module):
    """The lecture's ``MultiHeadAttentionWrapper`` (independent causal heads, concatenated) plus an
    output projection. Without a cache it runs the wrapper itself; with one it stacks the heads'
    own projections so decoding can reuse past keys and values like every other variant."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.heads = MultiHeadAttentionWrapper(
            cfg.d_model, self.head_dim, cfg.block_size, cfg.dropout, cfg.n_head, qkv_bias=cfg.qkv_bias, fused=True
        )
        self.proj = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, *, cache=None, positions=None, attn_mask=None):
        if cache is None and attn_mask is None:
            return self.proj(self.heads(x))
        B, T, _ = x.shape
        heads = self.heads.heads
        q = torch.stack([h.W_query(x) for h in heads], dim=1)  # (B, nh, T, hs)
        k = torch.stack([h.W_key(x) for h in heads], dim=1)
        v = torch.stack([h.W_value(x) for h in heads], dim=1)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, T_total, hs)
        p = self.dropout if self.training else 0.0
        y = self.heads._attend(q, k, v, causal=True, mask=attn_mask, dropout_p=p)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def new_cache(self, batch_size, max_len, *, dtype=None, device=None):
        if dtype is None or device is None:
            w = self.proj.weight
            dtype, device = dtype or w.dtype, device or w.device
        return KVCache(batch_size, self.n_head, max_len, self.head_dim, dtype=dtype, device=device)


def _dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity at p = 0: a decoding step calls it twice a block, and a call costs."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _attention(cfg: GPTConfig, layer: int) -> nn.Module:
    if cfg.attention == "wrapper":
        return LectureAttention(cfg)
    if cfg.attention == "mla":
        return MultiHeadLatentAttention(
            cfg.d_model, cfg.n_head, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim, rope_theta=cfg.rope_theta, rope_interleave=cfg.rope_interleave,
            mode=cfg.mla_mode, dropout=cfg.dropout, causal=True, norm_eps=cfg.norm_eps,
            rope_heads=cfg.mla_rope_heads, kv_norm=cfg.mla_kv_norm,
            rope_pairs=None if cfg.mla_rope_pairs is None else cfg.mla_rope_pairs[layer], rope_table_dim=cfg.head_dim,
        )
    return GroupedQueryAttention(
        cfg.d_model, cfg.n_head, cfg.n_kv_head, head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias,
        out_bias=cfg.bias, dropout=cfg.dropout, causal=True, rope=cfg.positions == "rope",
        rope_theta=cfg.rope_theta, rope_interleave=cfg.rope_interleave,
    )


def _ffn(cfg: GPTConfig, layer: int) -> nn.Module:
    if cfg.ffn == "moe" and layer >= cfg.n_dense_layers:
        return MoE(
            cfg.d_model, cfg.n_routed_experts, cfg.n_activated_experts, cfg.expert_hidden,
            n_shared_experts=cfg.n_shared_experts, score_func=cfg.score_func, route_scale=cfg.route_scale,
            n_expert_groups=cfg.n_expert_groups, n_limited_groups=cfg.n_limited_groups,
            aux_loss_coef=cfg.aux_loss_coef, bias_update_speed=cfg.bias_update_speed,
            capacity_factor=cfg.capacity_factor,
        )
    if cfg.activation == "swiglu":
        return SwiGLU(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)
    return MLP(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias, approximate="tanh" if cfg.activation == "gelu_tanh" else "none")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = _attention(cfg, layer)
        self.norm2 = _norm(cfg)
        self.ffn = _ffn(cfg, layer)
        self.drop = _dropout(cfg.dropout)

    def forward(self, x, cache=None, positions=None, attn_mask=None, rotary=None):
        attend = dict(cache=cache, positions=positions, attn_mask=attn_mask)
        if rotary is not None:
            attend["rotary"] = rotary
        x = x + self.drop(self.attn(self.norm1(x), **attend))
        return x + self.drop(self.ffn(self.norm2(x)))


# Output projections get a smaller init (GPT-2): the residual stream sums 2 * n_layer of them.
_RESIDUAL_OUT = ("attn.proj.weight", "attn.o_proj.weight", "attn.wo.weight", "ffn.proj.weight", "ffn.w2.weight",
                 "ffn.experts.w2", "ffn.shared_experts.w2.weight")


class GPT(SaveLoadMixin, HeadMaskMixin, nn.Module):
    """Token (+ learned position) embeddings, ``n_layer`` blocks, final norm, LM head.
    Saved and loaded as a folder (config.json + model.safetensors) by ``SaveLoadMixin``;
    ``set_head_mask`` / ``masked_heads`` scale every layer's heads (``HeadMaskMixin``)."""

    model_type = MODEL_TYPE
    config_class = GPTConfig

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        # One RoPE table for every layer (MLA always rotates its decoupled part), sliced per forward.
        # Partial RoPE (mla_rope_pairs) picks its pairs from a head_dim-wide table, the source model's.
        mla_partial = cfg.attention == "mla" and cfg.mla_rope_pairs is not None
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" and not mla_partial else cfg.head_dim
        uses_rope = cfg.attention == "mla" or (cfg.positions == "rope" and cfg.attention != "wrapper")
        self.rotary = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_interleave, cfg.block_size,
                                      scaling=cfg.rope_scaling) if uses_rope else None
        self.drop = _dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    @classmethod
    def from_config(cls, cfg: GPTConfig | dict) -> "GPT":
        return cls(cfg if isinstance(cfg, GPTConfig) else GPTConfig.from_dict(cfg))

    def _init_weights(self) -> None:
        """One rule for every parameter: matrices (dense FFN, experts, router, embeddings) N(0, 0.02),
        residual-stream output projections N(0, 0.02/√(2·n_layer)), biases 0, norm gains 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=residual_std if name.endswith(_RESIDUAL_OUT) else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, *, caches=None, positions=None, attn_mask=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None).

        caches: one per block (``new_caches``); positions default to start + arange(T) with
        start the number of cached tokens. Targets of -1 are ignored.
        """
        positions, end = self._check_positions(idx, caches, positions)
        x = self._residual_stream(idx, caches, positions, end, attn_mask)
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _check_positions(self, idx, caches, positions) -> tuple[torch.Tensor, int]:
        """Check ``idx`` (and caches, positions) as ``forward`` takes them; returns the positions of
        idx's tokens and one past the last of them."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            shown = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise InputTypeError(f"idx must be an integer tensor (batch, seq), got {shown}")
        T = idx.size(1)
        if caches is not None and len(caches) != len(self.blocks):
            raise ConfigError(f"caches has {len(caches)} entries: expected one per layer, n_layer={len(self.blocks)}")
        start = caches[0].length if caches is not None else 0
        if positions is None:
            positions, end = default_positions(start, T, idx.device)  # (T,), known without reading the device
        else:  # given positions are read once, here, and checked
            if positions.numel() and int(positions.min()) < 0:
                raise ConfigError(f"positions must be >= 0, got min {int(positions.min())}")
            end = int(positions.max()) + 1 if positions.numel() else 0
        if end > self.config.block_size:
            raise ConfigError(
                f"sequence reaches position {end - 1}, beyond block_size={self.config.block_size}: "
                f"feed at most {self.config.block_size} tokens (crop the context)"
            )
        return positions, end

    def _residual_stream(self, idx, caches, positions, end: int, attn_mask, keep: list | None = None) -> torch.Tensor:
        """The residual stream after the last block, (B, T, C); ``keep`` collects the token
        embedding and every block's output on the way (see :meth:`hidden_states`)."""
        x = self.wte(idx)  # (B, T, C)
        if keep is not None:
            keep.append(x)
        if self.wpe is not None:
            x = x + self.wpe(positions)  # (T, C) or (B, T, C), broadcast over the batch
        x = self.drop(x)
        rotary = None if self.rotary is None else self.rotary.cos_sin(positions, end)  # once for all layers
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], positions, attn_mask, rotary)
            if keep is not None:
                keep.append(x)
        return x

    def hidden_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """[token embedding, block 1's output, ..., block n's output], each (B, T, C).

        Entry 0 is the embedding lookup alone, before any attention and before learned positions
        are added (RoPE models never add one), so a token's entry 0 is the same in every context.
        The rest are the residual stream after each block, before the final norm; ``lm_head``
        of ``norm_f`` of the last one gives ``forward``'s logits.
        """
        positions, end = self._check_positions(idx, None, None)
        keep: list[torch.Tensor] = []
        self._residual_stream(idx, None, positions, end, None, keep)
        return keep

    def new_caches(self, batch_size: int, max_len: int, *, dtype=None, device=None) -> list:
        """One empty cache per layer, the type each layer's attention needs, by default in the token
        embedding's dtype and device: what the residual stream (and so every key and value) is computed
        in, also when the projections hold int8 weights."""
        dtype, device = dtype or self.wte.weight.dtype, device or self.wte.weight.device
        return [blk.attn.new_cache(batch_size, max_len, dtype=dtype, device=device) for blk in self.blocks]

    def moe_layers(self) -> list[nn.Module]:
        if self.config.ffn != "moe":
            return []
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, MoE)]

    @property
    def sparse_parameters(self) -> bool:
        """True when a step may leave parameters without gradient (MoE experts that got no token)."""
        return bool(self.moe_layers())

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward (0 without MoE)."""
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack([torch.as_tensor(a, dtype=torch.float32) for a in losses]).sum() if losses else torch.zeros(())

    def moe_stats(self) -> dict:
        """Routing statistics of the last forward, averaged over MoE layers (empty without MoE)."""
        stats = [m.last_stats for m in self.moe_layers() if getattr(m, "last_stats", None)]
        if not stats:
            return {}

        def mean(key):
            return sum(float(s[key]) for s in stats) / len(stats)

        return {
            "moe_load_imbalance": mean("load_imbalance"),
            "moe_router_entropy": mean("router_entropy"),
            "moe_dropped_tokens": int(sum(float(s["dropped_tokens"]) for s in stats)),
            "moe_tokens_per_expert": [[int(n) for n in torch.as_tensor(s["tokens_per_expert"]).tolist()] for s in stats],
        }

    def train_stats(self) -> dict:
        """What the trainer logs besides the loss: the MoE aux loss and routing statistics."""
        stats = self.moe_stats()
        return {"moe_aux_loss": float(self.aux_loss().detach()), **stats} if stats else {}

    def after_optimizer_step(self) -> None:
        """Aux-loss-free balancing step of every MoE layer (the trainer calls it after optimizer.step())."""
        for m in self.moe_layers():
            m.update_bias()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            super().load_state_tensors(tensors)
        except RuntimeError as err:  # shapes differ: weights of another architecture
            raise ConfigError(f"weights do not match the config (another architecture?): {' '.join(str(err).split())[:300]}") from None


register_model(MODEL_TYPE, GPT)
