"""attnlab GPTs out to Hugging Face folders that transformers (and tools reading its format) load.

``export_hf(folder, out)`` writes the attnlab checkpoint in ``folder`` as config.json +
model.safetensors (+ the tokenizer as a PreTrainedTokenizerFast folder) for the HF architecture
that computes the same function:

- RoPE + RMSNorm + SwiGLU + MHA/GQA/MQA → ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when only
  Q/K/V have biases: transformers' AutoTokenizer then swaps in Qwen2's own pre-tokenizer, so load
  that folder's tokenizer with ``PreTrainedTokenizerFast.from_pretrained``); interleaved RoPE is
  turned into Llama's rotate-half by reordering Q/K rows;
- learned positions + LayerNorm + GELU + MHA (or the lecture's wrapper of single heads, which is
  MHA with its heads' weights stacked) → ``GPT2LMHeadModel``; absent biases are written as zeros;
- MLA (+ MoE with sigmoid routing) → ``DeepseekV3ForCausalLM``; MLA + MoE with softmax routing →
  ``DeepseekV2ForCausalLM``.

Anything else is refused before a file is written, naming the feature no HF architecture has.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from attnlab.attention.rope import interleaved_to_half
from attnlab.errors import ConfigError
from attnlab.files import write_json
from attnlab.hf.checkpoint import SAFETENSORS_NAME, expert_names, hf_name, rescale_latent_inputs
from attnlab.hf.tokenizer import save_hf_tokenizer
from attnlab.models.base import load_pretrained, load_tokenizer_from
from attnlab.models.gpt import GPT, GPTConfig

log = logging.getLogger("attnlab")

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
                 "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def _refuse(feature: str, why: str) -> ConfigError:
    return ConfigError(f"{feature} has no equivalent HF architecture: {why}")


def hf_model_type_for(cfg: GPTConfig) -> str:
    """The HF model_type computing what a GPT of this config computes; a ConfigError naming the
    feature when there is none."""
    if cfg.attention == "mla":
        return _deepseek_type(cfg)
    if cfg.ffn == "moe":
        raise _refuse(f"ffn='moe' with attention={cfg.attention!r}", "HF's DeepSeek MoE decoders use MLA "
                      "(attention='mla'); Mixtral/Qwen-MoE route differently")
    if cfg.positions == "rope":
        if (cfg.norm, cfg.activation) != ("rmsnorm", "swiglu"):
            raise _refuse(f"positions='rope' with norm={cfg.norm!r}, activation={cfg.activation!r}",
                          "Llama-family models have RoPE with RMSNorm and SwiGLU")
        return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
    if cfg.norm != "layernorm" or cfg.activation not in ("gelu", "gelu_tanh"):
        raise _refuse(f"positions='learned' with norm={cfg.norm!r}, activation={cfg.activation!r}",
                      "GPT-2 has learned positions with LayerNorm and GELU")
    if cfg.attention not in ("mha", "wrapper") or cfg.n_head * cfg.head_dim != cfg.d_model:
        raise _refuse(f"attention={cfg.attention!r} with n_head * head_dim = {cfg.n_head * cfg.head_dim} "
                      f"(d_model={cfg.d_model})", "GPT-2 has one K/V head per query head and heads that split d_model")
    return "gpt2"


def _deepseek_type(cfg: GPTConfig) -> str:
    if cfg.positions != "rope" or cfg.norm != "rmsnorm" or cfg.bias:
        raise _refuse(f"attention='mla' with positions={cfg.positions!r}, norm={cfg.norm!r}, bias={cfg.bias}",
                      "DeepSeek's MLA models have no learned positions, use RMSNorm and no biases")
    dense_layers = cfg.n_layer if cfg.ffn == "dense" else cfg.n_dense_layers
    if dense_layers and cfg.activation != "swiglu":
        raise _refuse(f"dense FFN layers with activation={cfg.activation!r}", "DeepSeek's dense layers are SwiGLU")
    if cfg.ffn == "dense" or cfg.score_func == "sigmoid":
        if cfg.ffn == "moe" and cfg.n_expert_groups > 1 and cfg.bias_update_speed == 0:
            raise _refuse("n_expert_groups > 1 with bias_update_speed=0 (groups ranked by their best expert)",
                          "DeepSeek-V3 ranks groups by their top-2 experts, as attnlab does with bias balancing on")
        model_type = "deepseek_v3"
    else:
        if not cfg.rope_interleave:
            raise _refuse("a softmax router with rope_interleave=False", "DeepSeek-V2 rotates interleaved pairs")
        if cfg.bias_update_speed > 0:
            raise _refuse("a softmax router with bias balancing (bias_update_speed > 0)",
                          "DeepSeek-V2's router has no balancing bias")
        model_type = "deepseek_v2"
    if cfg.ffn == "moe" and cfg.capacity_factor is not None:
        raise _refuse(f"capacity_factor={cfg.capacity_factor} (token dropping)", "HF's MoE layers drop no tokens")
    return model_type


def _rope_fields(cfg: GPTConfig) -> dict:
    """RoPE as transformers 5 writes it (rope_parameters) and as older readers look for it."""
    scaling = cfg.rope_scaling or {}
    fields = {"rope_parameters": {"rope_type": scaling.get("rope_type", "default"), "rope_theta": cfg.rope_theta,
                                  **{k: v for k, v in scaling.items() if k != "rope_type"}},
              "rope_theta": cfg.rope_theta}
    return {**fields, "rope_scaling": dict(scaling)} if scaling else fields


def hf_config(cfg: GPTConfig, model_type: str) -> dict:
    """The HF config.json (as a dict) of a ``model_type`` model equal to a GPT of config ``cfg``."""
    common = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings}
    if model_type == "gpt2":
        return {**common, "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.ffn_hidden, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "gelu",
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    common.update(hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                  hidden_act="silu", attention_dropout=cfg.dropout, **_rope_fields(cfg))
    if model_type in ("llama", "qwen2"):
        common.update(num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim)
        if model_type == "qwen2":
            return {**common, "use_sliding_window": False, "max_window_layers": cfg.n_layer}
        return {**common, "attention_bias": cfg.bias or cfg.qkv_bias, "mlp_bias": cfg.bias}
    moe = cfg.ffn == "moe"
    common.update(
        num_key_value_heads=cfg.n_head, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        head_dim=cfg.qk_rope_head_dim, attention_bias=False, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_activated_experts, n_shared_experts=cfg.n_shared_experts,
        moe_intermediate_size=cfg.expert_hidden, first_k_dense_replace=cfg.n_dense_layers if moe else cfg.n_layer,
        routed_scaling_factor=cfg.route_scale, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
    )
    if model_type == "deepseek_v2":
        return {**common, "topk_method": "group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy",
                "norm_topk_prob": False}
    return {**common, "norm_topk_prob": True, "rope_interleave": cfg.rope_interleave, "num_nextn_predict_layers": 0}


def _wrapper_as_mha(state: dict, cfg: GPTConfig) -> tuple[dict, GPTConfig]:
    """The lecture wrapper's state as MHA's: each head's W_query/W_key/W_value rows stacked into
    q_proj/k_proj/v_proj (head h is rows h·hs..), its output ``proj`` as o_proj. The same function."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[2:5] == ["attn", "heads", "heads"]:
            if parts[6] == "mask":  # the heads' causal-mask buffers
                continue
            proj = {"W_query": "q_proj", "W_key": "k_proj", "W_value": "v_proj"}[parts[6]]
            out.setdefault(f"blocks.{parts[1]}.attn.{proj}.{parts[7]}", []).append(value)
        else:
            out[key.replace(".attn.proj.", ".attn.o_proj.")] = value
    return {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}, dataclasses.replace(
        cfg, attention="mha")


def _with_zero_biases(state: dict, cfg: GPTConfig, model_type: str) -> dict:
    """Zero biases where the HF architecture has biases this model lacks (GPT-2 has them on every
    Linear and LayerNorm, Llama's attention_bias on all four projections): the same function."""
    has = {"gpt2": (True, True), "llama": (cfg.bias, cfg.bias or cfg.qkv_bias)}.get(model_type)
    if has is None or has == (cfg.bias, cfg.qkv_bias):
        return state
    with torch.device("meta"):  # shapes only
        twin = GPT(dataclasses.replace(cfg, bias=has[0], qkv_bias=has[1])).state_dict()
    zeros = {k: torch.zeros(t.shape, dtype=state["wte.weight"].dtype) for k, t in twin.items() if k not in state}
    return {**state, **zeros}


def hf_state(state: dict[str, torch.Tensor], cfg: GPTConfig, model_type: str) -> dict[str, torch.Tensor]:
    """A GPT's state_dict under ``model_type``'s HF names (the tables of :mod:`attnlab.hf.checkpoint`)."""
    if cfg.attention == "wrapper":
        state, cfg = _wrapper_as_mha(state, cfg)
    state = rescale_latent_inputs(_with_zero_biases(state, cfg, model_type), cfg, to_attnlab=False)
    if model_type == "deepseek_v2" and any(t.any() for k, t in state.items() if k.endswith("ffn.gate.bias")):
        raise _refuse("a non-zero router bias", "DeepSeek-V2's router has no balancing bias")
    out, fused = {}, {}
    for key, value in state.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        experts = expert_names(model_type, key, cfg.n_routed_experts)
        if experts is not None:
            out.update(zip(experts, value.unbind(0)))
            continue
        name = hf_name(model_type, key)
        if name is None:
            continue
        if model_type in ("llama", "qwen2") and cfg.rope_interleave and key.split(".")[-2] in ("q_proj", "k_proj"):
            value = interleaved_to_half(value, cfg.n_head if ".q_proj." in key else cfg.n_kv_head)
        value = value.t() if name.transpose and value.dim() == 2 else value
        if name.part is None:
            out[name.hf] = value
        else:  # GPT-2's c_attn: q | k | v side by side
            fused.setdefault(name.hf, [None] * 3)[name.part] = value
    out.update({name: torch.cat(parts, dim=-1) for name, parts in fused.items()})
    if model_type.startswith("deepseek") and cfg.ffn == "moe" and not cfg.n_shared_experts:
        d = cfg.d_model  # HF builds a zero-width shared expert where there is none
        for i in range(cfg.n_dense_layers, cfg.n_layer):
            for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                out[f"model.layers.{i}.mlp.shared_experts.{proj}.weight"] = torch.zeros(shape)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_hf(folder: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """Write the attnlab GPT saved in ``folder`` as an HF folder ``out`` (see the module docstring):
    config.json, model.safetensors and, when ``folder`` has one, the tokenizer. Every check runs
    before anything is written; an existing ``out`` is replaced only with ``overwrite``."""
    folder, out = Path(folder), Path(out)
    if out.exists() and (not overwrite or not out.is_dir()):
        kind = "a file" if not out.is_dir() else "an existing folder"
        raise ConfigError(f"out={str(out)!r} is {kind}: pass overwrite=True (CLI: --overwrite) to replace a folder")
    if out.exists() and out.resolve() == folder.resolve():
        raise ConfigError(f"out={str(out)!r} is the checkpoint folder itself: export into another folder")
    model = load_pretrained(folder)
    if not isinstance(model, GPT):
        raise ConfigError(f"{str(folder)!r} holds a {model.model_type!r} model: export writes attnlab GPTs")
    cfg = model.config
    model_type = hf_model_type_for(cfg)
    config, state = hf_config(cfg, model_type), hf_state(model.state_dict(), cfg, model_type)
    tokenizer = load_tokenizer_from(folder)
    for key, value in (("eos_token_id", getattr(tokenizer, "eos_id", None)),
                       ("bos_token_id", getattr(tokenizer, "bos_id", None))):
        config[key] = value
    config["dtype"] = str(state[next(iter(state))].dtype).removeprefix("torch.")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(state, str(staging / SAFETENSORS_NAME), metadata={"format": "pt"})
    write_json(staging / "config.json", config)
    names = [SAFETENSORS_NAME, "config.json"]
    if tokenizer is not None:
        names += [p.name for p in save_hf_tokenizer(tokenizer, staging, model_max_length=cfg.block_size)]
        if model_type == "qwen2":
            log.warning("transformers' AutoTokenizer gives qwen2 folders Qwen2's own pre-tokenizer: load this "
                        "tokenizer with PreTrainedTokenizerFast.from_pretrained(%r)", str(out))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return [out / name for name in names]
