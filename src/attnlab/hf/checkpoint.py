"""Any local Hugging Face checkpoint folder in attnlab's own models: ``from_hf_pretrained(folder)``.

A folder as ``save_pretrained`` writes it (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) of a Llama-family decoder (Llama, SmolLM, Qwen2: GQA + RoPE, also
with linear or llama3 RoPE scaling), GPT-2, a BERT-style encoder or DeepSeek-V2/V3 (MLA, MoE)
becomes attnlab's GPT or Encoder with the same logits. Weights are read with safetensors only:
a folder holding pickled weights (pytorch_model.bin) is refused without opening them.

The weight names of each family live in one table per family (:data:`HF_NAMES`), read in both
directions: here to load, by :mod:`attnlab.hf.export` to write HF folders.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from attnlab.attention.rope import ROPE_SCALINGS
from attnlab.errors import ConfigError
from attnlab.hf.bert import bert_state_dict, encoder_config_from_bert
from attnlab.models.base import read_config
from attnlab.models.encoder import Encoder
from attnlab.models.gpt import GPT, GPTConfig

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DECODERS = ("llama", "qwen2", "gpt2", "deepseek_v2", "deepseek_v3")
ENCODERS = ("bert",)
HF_MODEL_TYPES = DECODERS + ENCODERS


@dataclass(frozen=True)
class Name:
    """Where one attnlab parameter lives in an HF checkpoint: ``hf`` (a module path, or a full
    parameter name when it ends in a parameter), stored transposed (GPT-2's Conv1D keeps
    (in, out)), or as third ``part`` of GPT-2's fused Q|K|V ``c_attn``."""

    hf: str
    transpose: bool = False
    part: int | None = None


_LLAMA_BODY = {"wte": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"}
_LLAMA_LAYER = {
    "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj",
}
_DEEPSEEK_LAYER = {
    **_LLAMA_LAYER,
    "attn.wq": "self_attn.q_proj", "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj", "attn.wo": "self_attn.o_proj",
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj", "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
}
_GPT2_BODY = {"wte": "transformer.wte", "wpe": "transformer.wpe", "norm_f": "transformer.ln_f", "lm_head": "lm_head"}
_GPT2_LAYER = {
    "norm1": Name("ln_1"), "norm2": Name("ln_2"),
    "attn.q_proj": Name("attn.c_attn", True, 0), "attn.k_proj": Name("attn.c_attn", True, 1),
    "attn.v_proj": Name("attn.c_attn", True, 2), "attn.o_proj": Name("attn.c_proj", True),
    "ffn.fc": Name("mlp.c_fc", True), "ffn.proj": Name("mlp.c_proj", True),
}
_DEEPSEEK_V2_LAYER = {**_DEEPSEEK_LAYER, "ffn.gate.bias": None}  # V2's router has no balancing bias
# model_type -> (whole-model names, per-layer names, the prefix of layer i, the base model's prefix)
HF_NAMES = {
    "llama": (_LLAMA_BODY, _LLAMA_LAYER, "model.layers.{i}.", "model."),
    "qwen2": (_LLAMA_BODY, _LLAMA_LAYER, "model.layers.{i}.", "model."),
    "deepseek_v2": (_LLAMA_BODY, _DEEPSEEK_V2_LAYER, "model.layers.{i}.", "model."),
    "deepseek_v3": (_LLAMA_BODY, _DEEPSEEK_LAYER, "model.layers.{i}.", "model."),
    "gpt2": (_GPT2_BODY, _GPT2_LAYER, "transformer.h.{i}.", "transformer."),
}
_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # attnlab's stacked experts -> HF's per expert
# HF keys that hold no weights attnlab needs: GPT-2's causal-mask buffers, old rotary caches.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def hf_name(model_type: str, key: str) -> Name | None:
    """The HF location of attnlab parameter ``key`` (e.g. "blocks.3.attn.q_proj.weight") in a
    ``model_type`` checkpoint; None where the family stores no such parameter. Stacked experts
    ("blocks.3.ffn.experts.w1") are not one name: see :func:`expert_names`."""
    body, layer, layer_prefix, _ = HF_NAMES[model_type]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    table, rest, prefix = (layer, match.group(2), layer_prefix.format(i=match.group(1))) if match else (body, key, "")
    module, _, param = rest.rpartition(".")
    for found, tail in ((rest, ""), (module, "." + param)):
        if found in table:
            theirs = table[found]
            if theirs is None:
                return None
            theirs = theirs if isinstance(theirs, Name) else Name(theirs)
            return Name(prefix + theirs.hf + tail, theirs.transpose, theirs.part)
    raise ConfigError(f"attnlab parameter {key!r} has no counterpart in a {model_type!r} checkpoint")


def expert_names(model_type: str, key: str, n_experts: int) -> list[str] | None:
    """HF names of expert 0..n-1's matrix for a stacked attnlab expert parameter, else None."""
    match = re.fullmatch(r"blocks\.(\d+)\.ffn\.experts\.(w[123])", key)
    if match is None:
        return None
    prefix = HF_NAMES[model_type][2].format(i=match.group(1))
    return [f"{prefix}mlp.experts.{j}.{_EXPERTS[match.group(2)]}.weight" for j in range(n_experts)]


def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: model.safetensors, or the shards its index lists.
    Pickled weights are refused unopened: unpickling a file can run any code it carries."""
    folder = Path(folder)
    single, index = folder / SAFETENSORS_NAME, folder / SAFETENSORS_INDEX
    if single.is_file():
        files, expected = [single], None
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{str(index)!r} is corrupt: expected JSON with a 'weight_map' ({err})") from None
        files, expected = [folder / name for name in sorted(set(weight_map.values()))], set(weight_map)
        missing = [f.name for f in files if not f.is_file() or f.suffix != ".safetensors"]
        if missing:
            raise ConfigError(f"{str(index)!r} lists {', '.join(missing)}: missing or not .safetensors files")
    else:
        pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        found = f"only pickled weights ({', '.join(pickled)}), which attnlab never opens" if pickled else "no weights"
        raise ConfigError(
            f"model folder {str(folder)!r} has {found}: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX} "
            "(transformers' save_pretrained writes safetensors; unpickling a .bin file can run code)"
        )
    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{str(path)!r} is corrupt: {err}") from None
    if expected is not None and expected - set(tensors):
        raise ConfigError(f"{str(index)!r} names tensors no shard holds: {sorted(expected - set(tensors))[:5]}")
    return tensors


def hf_model_type(folder: str | os.PathLike) -> str | None:
    """The HF model_type of a checkpoint folder that :func:`from_hf_pretrained` reads, else None
    (an attnlab folder, or a folder without config.json)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    model_type = read_config(folder)["model_type"]
    return model_type if model_type in HF_MODEL_TYPES else None


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) from transformers 5's rope_parameters or the older
    rope_theta + rope_scaling fields."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported: "
                          "attnlab rotates every feature of a head")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"rope_type={kind!r} (RoPE scaling) is not supported: attnlab implements "
                          f"'default', {', '.join(repr(k) for k in ROPE_SCALINGS)}")
    return theta, {"rope_type": kind, **{k: params[k] for k in ROPE_SCALINGS[kind] if k in params}}


def _silu(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported: attnlab's SwiGLU uses 'silu'")


def _llama_config(hf: dict) -> GPTConfig:
    """Llama, SmolLM and Qwen2 (which adds Q/K/V biases): GQA + RoPE + SwiGLU + RMSNorm."""
    _silu(hf)
    n_head = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_head
    if hf["model_type"] == "qwen2":
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
            raise ConfigError("use_sliding_window=True is not supported: attnlab's attention sees the whole context")
        qkv_bias, bias = True, False
    else:
        qkv_bias, bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if qkv_bias != bias:
            raise ConfigError(f"attention_bias={qkv_bias} with mlp_bias={bias} is not supported: attnlab's GPT has "
                              "biases on Q/K/V only (as Qwen2) or on every Linear")
    theta, scaling = _rope(hf)
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, n_kv_head=n_kv, d_model=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        attention="mha" if n_kv == n_head else "mqa" if n_kv == 1 else "gqa", activation="swiglu",
        ffn_hidden=hf["intermediate_size"], positions="rope", rope_theta=theta, rope_scaling=scaling,
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=0.0, bias=bias, qkv_bias=qkv_bias,
    )


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_config(hf: dict) -> GPTConfig:
    """GPT-2: learned positions, LayerNorm, (tanh) GELU, MHA, biases everywhere."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise ConfigError(f"activation_function={act!r} is not supported: expected one of {sorted(_GPT2_ACTIVATIONS)}")
    for flag, allowed in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                          ("scale_attn_weights", True)):
        if hf.get(flag, allowed) != allowed:
            raise ConfigError(f"{flag}={hf[flag]!r} is not supported: attnlab's GPT-2 blocks need {flag}={allowed}")
    d = hf["n_embd"]
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        d_model=d, attention="mha", activation=_GPT2_ACTIVATIONS[act], ffn_hidden=hf.get("n_inner") or 4 * d,
        positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0, bias=True,
    )


def _deepseek_moe(hf: dict) -> dict:
    """GPTConfig fields of DeepSeek's MoE layers: V2 routes with softmax (optionally limited to the
    best groups by their top expert), V3 with sigmoid, a balancing bias, renormalised top-k
    weights and groups ranked by their top-2 sum."""
    fields = dict(ffn="moe", n_routed_experts=hf["n_routed_experts"], n_activated_experts=hf["num_experts_per_tok"],
                  n_shared_experts=hf.get("n_shared_experts") or 0, expert_hidden=hf["moe_intermediate_size"],
                  n_dense_layers=hf.get("first_k_dense_replace", 0), route_scale=hf.get("routed_scaling_factor", 1.0),
                  aux_loss_coef=0.0)
    grouped = dict(n_expert_groups=hf.get("n_group") or 1, n_limited_groups=hf.get("topk_group") or 1)
    if hf["model_type"] == "deepseek_v2":
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method={method!r} is not supported: expected 'greedy' or 'group_limited_greedy'")
        return {**fields, "score_func": "softmax", **(grouped if method == "group_limited_greedy" else {})}
    if not hf.get("norm_topk_prob", True) or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"norm_topk_prob={hf.get('norm_topk_prob')!r}, scoring_func={hf.get('scoring_func')!r}: "
                          "attnlab's sigmoid router renormalises its top-k weights (norm_topk_prob=True, 'sigmoid')")
    # V3 balances experts with a bias (the paper's update speed 0.001); in attnlab a non-zero
    # speed also makes the router rank expert groups by their top-2 sum, as V3 does.
    return {**fields, "score_func": "sigmoid", "bias_update_speed": 1e-3, **grouped}


def _deepseek_config(hf: dict) -> GPTConfig:
    """DeepSeek-V2/V3: MLA (decoupled RoPE, optional query compression) + dense or MoE SwiGLU."""
    _silu(hf)
    n_head = hf["num_attention_heads"]
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias=True is not supported: attnlab's MLA projections have no bias")
    if (hf.get("num_key_value_heads") or n_head) != n_head:
        raise ConfigError(f"num_key_value_heads={hf['num_key_value_heads']} differs from num_attention_heads={n_head}: "
                          "MLA has one key/value head per query head")
    theta, scaling = _rope(hf)
    moe = _deepseek_moe(hf) if hf.get("n_routed_experts") and hf.get("first_k_dense_replace", 0) < hf["num_hidden_layers"] else {}
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, d_model=hf["hidden_size"], head_dim=hf["v_head_dim"], attention="mla",
        q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        activation="swiglu", ffn_hidden=hf["intermediate_size"], positions="rope", rope_theta=theta,
        rope_scaling=scaling, rope_interleave=hf["model_type"] == "deepseek_v2" or hf.get("rope_interleave", True),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=0.0, **moe,
    )


_CONFIGS = {"llama": _llama_config, "qwen2": _llama_config, "gpt2": _gpt2_config,
            "deepseek_v2": _deepseek_config, "deepseek_v3": _deepseek_config}


def gpt_config_from_hf(hf: dict) -> GPTConfig:
    """The GPTConfig an HF decoder's config.json (as a dict) describes."""
    model_type = hf.get("model_type")
    if model_type not in _CONFIGS:
        raise ConfigError(f"model_type={model_type!r} is not a decoder attnlab reads: expected one of {', '.join(DECODERS)}")
    try:
        return _CONFIGS[model_type](hf)
    except KeyError as err:
        raise ConfigError(f"the {model_type} config.json lacks {err}") from None


def _take(tensors: dict, name: str, model_type: str) -> torch.Tensor:
    if name not in tensors:
        raise ConfigError(f"the {model_type} checkpoint lacks {name!r} (another architecture, or an incomplete folder?)")
    return tensors.pop(name)


def _as_saved(tensors: dict, model_type: str) -> dict:
    """Keys as a *ForCausalLM saves them: a bare base model's ("layers.0...") get its prefix, and
    fused expert tensors (E, 2·hidden, d) "experts.gate_up_proj" are split per expert."""
    prefix = HF_NAMES[model_type][3]
    if not any(k.startswith(prefix) for k in tensors):
        tensors = {k if k.startswith("lm_head.") else prefix + k: v for k, v in tensors.items()}
    saved = {}
    for key, value in tensors.items():
        base, _, kind = key.rpartition(".")
        if base.endswith(".experts") and kind in ("gate_up_proj", "down_proj"):
            halves = value.chunk(2, dim=1) if kind == "gate_up_proj" else (value,)
            for name, part in zip(("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",), halves):
                saved.update({f"{base}.{j}.{name}.weight": w for j, w in enumerate(part.unbind(0))})
        else:
            saved[key] = value
    return saved


def gpt_state_from_hf(tensors: dict[str, torch.Tensor], cfg: GPTConfig, model_type: str,
                      defaults: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """attnlab GPT parameters (the keys of ``defaults``, a model's state_dict) from HF checkpoint
    tensors. A parameter the family does not store keeps its default (DeepSeek-V2's router has no
    balancing bias); every HF tensor must be used, except known buffers, empty ones (DeepSeek's
    zero-width shared expert) and DeepSeek-V3's multi-token-prediction layer beyond n_layer."""
    left = _as_saved(tensors, model_type)
    state, fused = {}, {}
    for key, default in defaults.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            left.pop("lm_head.weight", None)
            state[key] = state["wte.weight"]
            continue
        experts = expert_names(model_type, key, cfg.n_routed_experts)
        name = None if experts else hf_name(model_type, key)
        if experts:
            state[key] = torch.stack([_take(left, n, model_type) for n in experts])  # (E, out, in)
        elif name is None:
            state[key] = default
        else:
            if name.part is not None:  # GPT-2's c_attn holds q | k | v side by side
                if name.hf not in fused:
                    fused[name.hf] = _take(left, name.hf, model_type).chunk(3, dim=-1)
                value = fused[name.hf][name.part]
            else:
                value = _take(left, name.hf, model_type)
            state[key] = value.t() if name.transpose and value.dim() == 2 else value
    unused = [k for k, t in left.items() if t.numel() and not _IGNORED.search(k) and not _beyond_layers(k, cfg.n_layer)]
    if unused:
        raise ConfigError(f"the {model_type} checkpoint has weights attnlab would not use: {sorted(unused)[:5]}")
    return rescale_latent_inputs(state, cfg, to_attnlab=True)


HF_LATENT_NORM_EPS = 1e-6  # transformers' DeepSeek q_a/kv_a_layernorm ignore rms_norm_eps


def rescale_latent_inputs(state: dict[str, torch.Tensor], cfg: GPTConfig, to_attnlab: bool) -> dict:
    """MLA's latent norms run with norm_eps in attnlab but eps 1e-6 in transformers' DeepSeek. RMSNorm
    ignores the scale of its input except through eps: RMSNorm_eps(c·z) = RMSNorm_{eps/c²}(z), so rows
    that produce the latents scaled by c = √(norm_eps / 1e-6) (wq_a, and the c_kv rows of wkv_a)
    make both compute the same function. ``to_attnlab``: HF weights in, else attnlab weights out."""
    if cfg.attention != "mla" or cfg.norm_eps == HF_LATENT_NORM_EPS:
        return state
    scale = (cfg.norm_eps / HF_LATENT_NORM_EPS) ** 0.5
    scale = scale if to_attnlab else 1 / scale
    state = dict(state)
    for i in range(cfg.n_layer):
        if cfg.q_lora_rank:
            state[f"blocks.{i}.attn.wq_a.weight"] = state[f"blocks.{i}.attn.wq_a.weight"] * scale
        wkv_a = state[f"blocks.{i}.attn.wkv_a.weight"].clone()  # (kv_lora_rank + rope dims, d): c_kv rows first
        wkv_a[:cfg.kv_lora_rank] *= scale
        state[f"blocks.{i}.attn.wkv_a.weight"] = wkv_a
    return state


def _beyond_layers(key: str, n_layer: int) -> bool:
    """DeepSeek-V3's multi-token-prediction module is stored as layer n_layer; transformers skips it too."""
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return match is not None and int(match.group(1)) >= n_layer


def from_hf_pretrained(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device=None):
    """attnlab's own model with the weights of a local HF checkpoint folder, in eval mode: a
    :class:`~attnlab.models.gpt.GPT` for Llama/SmolLM/Qwen2/GPT-2/DeepSeek-V2/V3, an
    :class:`~attnlab.models.encoder.Encoder` for BERT-style encoders."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype!r} is not allowed: expected a floating torch.dtype such as torch.float32")
    folder = Path(folder)
    hf = read_config(folder)
    model_type = hf["model_type"]
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"{str(folder / 'config.json')!r} has model_type={model_type!r}: attnlab reads HF checkpoints "
                          f"of model_type {', '.join(HF_MODEL_TYPES)}")
    if model_type in ENCODERS:
        model = Encoder(encoder_config_from_bert(hf))
        model.load_state_dict(bert_state_dict(read_safetensors(folder)), strict=True)
    else:
        cfg = gpt_config_from_hf(hf)
        model = GPT(cfg)
        model.load_state_tensors(gpt_state_from_hf(read_safetensors(folder), cfg, model_type, model.state_dict()))
    return model.to(device=device, dtype=dtype).eval()
