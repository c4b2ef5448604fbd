"""Attention modules of HF transformers (GPT-2, Llama/SmolLM2, DeepSeek-V2/V3 MLA) turned into
attnlab's own modules with their weights.

``from_hf(hf_attention)`` reads the config from the HF module, builds the equivalent attnlab
module and copies the weights, so both give the same output on the same input. Loaders are
looked up by HF class name in ``HF_LOADERS``; add one with ``@register_hf_loader("ClassName")``.
transformers itself is never imported here: loaders only read attributes of the module given.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.attention.mla import MultiHeadLatentAttention
from attnlab.errors import ConfigError, InputTypeError

HF_LOADERS: dict[str, Callable[[nn.Module], nn.Module]] = {}


def register_hf_loader(*class_names: str):
    """Decorator: use the decorated function to convert HF modules of these class names."""
    def register(loader):
        for name in class_names:
            HF_LOADERS[name] = loader
        return loader
    return register


def from_hf(hf_attention: nn.Module) -> nn.Module:
    """The attnlab module equivalent to an HF attention module, with its weights, dtype, device
    and train/eval mode."""
    if not isinstance(hf_attention, nn.Module):
        raise InputTypeError(f"from_hf expects an HF attention nn.Module, got {type(hf_attention).__name__}")
    for cls in type(hf_attention).__mro__:
        loader = HF_LOADERS.get(cls.__name__)
        if loader is not None:
            module = loader(hf_attention)
            return module.train(hf_attention.training)
    supported = ", ".join(sorted(HF_LOADERS))
    raise ConfigError(
        f"from_hf got a {type(hf_attention).__name__}: expected one of {supported} (an attention module, not a whole model)"
    )


def _copy(module: nn.Module, weights: dict[str, torch.Tensor], like: torch.Tensor) -> nn.Module:
    """Move module to like's dtype/device and load weights (strict: every parameter is set)."""
    module = module.to(dtype=like.dtype, device=like.device)
    module.load_state_dict({name: w.detach().clone() for name, w in weights.items()}, strict=True)
    return module


@register_hf_loader("GPT2Attention")
def _from_gpt2(attn: nn.Module) -> GroupedQueryAttention:
    """GPT-2: one Conv1D ``c_attn`` holds Q, K and V side by side as (d_in, 3·d) — transposed
    relative to nn.Linear — and ``c_proj`` is the output projection; all with biases."""
    if attn.is_cross_attention:
        raise ConfigError("GPT2Attention with is_cross_attention=True is not supported: load a self-attention layer")
    d, n_heads = attn.embed_dim, attn.num_heads
    module = GroupedQueryAttention(d, n_heads, n_heads, qkv_bias=True, out_bias=True,
                                   dropout=attn.attn_dropout.p, scale=attn.scaling)
    w, b = attn.c_attn.weight, attn.c_attn.bias  # (d, 3d), (3d,)
    weights = {"o_proj.weight": attn.c_proj.weight.t(), "o_proj.bias": attn.c_proj.bias}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        weights[f"{name}.weight"] = w[:, i * d:(i + 1) * d].t()
        weights[f"{name}.bias"] = b[i * d:(i + 1) * d]
    return _copy(module, weights, w)


@register_hf_loader("LlamaAttention")
def _from_llama(attn: nn.Module) -> GroupedQueryAttention:
    """Llama (and SmolLM2): separate q/k/v/o projections, GQA, rotate-half RoPE; the RoPE base
    comes from the config, since HF keeps the rotary embedding outside the attention module."""
    cfg = attn.config
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(
            f"rope_type={rope_type!r} (RoPE scaling) is not supported: attnlab implements rope_type='default'"
        )
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ConfigError("the Llama config has no rope_theta: expected config.rope_parameters['rope_theta']")
    module = GroupedQueryAttention(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim=attn.head_dim,
        qkv_bias=attn.q_proj.bias is not None, out_bias=attn.o_proj.bias is not None,
        dropout=float(cfg.attention_dropout), rope=True, rope_theta=float(theta), rope_interleave=False,
        scale=attn.scaling,
    )
    weights = {f"{name}.{p}": t for name in ("q_proj", "k_proj", "v_proj", "o_proj")
               for p, t in getattr(attn, name).named_parameters()}
    return _copy(module, weights, attn.q_proj.weight)


@register_hf_loader("DeepseekV2Attention", "DeepseekV3Attention")
def mla_from_hf_deepseek(hf_attention: nn.Module) -> MultiHeadLatentAttention:
    """Build an MLA module from transformers' DeepseekV2Attention / DeepseekV3Attention, weights copied.

    The config is read from the module. Only default RoPE is supported (no YaRN scaling);
    V2 always rotates adjacent pairs, V3 follows its config's ``rope_interleave``.
    """
    config = getattr(hf_attention, "config", None)
    if config is None:
        raise InputTypeError(f"{type(hf_attention).__name__} has no .config: expected a DeepSeek attention module")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(
            f"rope_parameters rope_type={rope_type!r} is not supported: attnlab's MLA implements plain "
            f"RoPE (rope_type='default'), not YaRN or other scaled variants"
        )
    if getattr(config, "attention_bias", False):
        raise ConfigError("attention_bias=True is not supported: attnlab's MLA projections have no bias")
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    if n_kv_heads != n_heads:
        raise ConfigError(
            f"num_key_value_heads={n_kv_heads} differs from num_attention_heads={n_heads}: "
            f"MLA has one key/value head per query head"
        )
    # DeepSeek-V2 always rotates adjacent pairs (complex view); V3 reads rope_interleave.
    interleave = True if config.model_type == "deepseek_v2" else getattr(config, "rope_interleave", True)
    q_lora_rank = config.q_lora_rank or 0
    weight = hf_attention.kv_b_proj.weight
    module = MultiHeadLatentAttention(
        config.hidden_size,
        n_heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_interleave=bool(interleave),
        dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        norm_eps=hf_attention.kv_a_layernorm.variance_epsilon,
    ).to(device=weight.device, dtype=weight.dtype)

    names = {
        "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
    }
    if q_lora_rank == 0:
        names["wq"] = "q_proj"
    else:
        names.update(wq_a="q_a_proj", q_norm="q_a_layernorm", wq_b="q_b_proj")
    with torch.no_grad():
        for ours, theirs in names.items():
            source = getattr(hf_attention, theirs).weight
            target = getattr(module, ours).weight
            if source.shape != target.shape:
                raise ConfigError(
                    f"{theirs}.weight has shape {tuple(source.shape)} but the config gives "
                    f"{ours}.weight shape {tuple(target.shape)}: the module does not match its config"
                )
            target.copy_(source)
    return module.train(hf_attention.training)
