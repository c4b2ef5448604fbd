"""KV-cache size per token for MHA, GQA, MQA and MLA (DeepSeek-V2, Table 1), from real configs.

Per token and layer a cache holds 2·n_h·d_h numbers for MHA, 2·n_g·d_h for GQA, 2·d_h for MQA
and d_c + d_h^R for MLA (the latent plus the shared RoPE key). Every row is also measured: an
attnlab cache is built at the row's dimensions and its ``bytes()`` reported next to the formula.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch

from attnlab import _checks
from attnlab.attention.cache import KVCache, LatentKVCache, kv_elements_per_token, latent_elements_per_token
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.attention.mla import MultiHeadLatentAttention, mla_dims
from attnlab.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Attention-relevant fields of each model's HF config.json (checked against transformers' config
# classes and the published configs).
BUILTIN_CONFIGS: dict[str, dict] = {
    "gpt2-124m": {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768},
    "llama-3-8b": {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "hidden_size": 4096, "head_dim": 128},
    "smollm2-135m": {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64},
    "deepseek-v2": {"model_type": "deepseek_v2", "num_hidden_layers": 60, "num_attention_heads": 128,
                    "hidden_size": 5120, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                    "qk_nope_head_dim": 128, "v_head_dim": 128},
    "deepseek-v3": {"model_type": "deepseek_v3", "num_hidden_layers": 61, "num_attention_heads": 128,
                    "hidden_size": 7168, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                    "qk_nope_head_dim": 128, "v_head_dim": 128},
}


@dataclass(frozen=True)
class AttentionDims:
    """What the KV cache depends on: layers, heads, head size and, for MLA, the latent sizes."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    kv_lora_rank: int = 0  # d_c; 0 = not MLA
    qk_rope_head_dim: int = 0  # d_h^R
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def kind(self) -> str:
        if self.kv_lora_rank:
            return "MLA"
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"


@dataclass(frozen=True)
class KVRow:
    """One attention variant at one model's dims; bytes are for one sequence (batch 1)."""

    model: str
    attention: str  # "MHA", "GQA", "MQA", "MLA" or "MLA naive"
    dims: str  # the sizes the formula uses, e.g. "n_g=8, d_h=128"
    formula: str
    actual: bool  # the model's own attention (others: what it would cost at its dims)
    n_layers: int
    elements_per_token_layer: int
    bytes_per_token_layer: int
    bytes_per_token: int  # all layers
    context: int
    bytes_at_context: int  # all layers, `context` tokens
    measured_bytes_per_token_layer: int  # held by an attnlab cache at these dims, per token


def dims_from_config(cfg: dict, name: str = "config") -> AttentionDims:
    """Read attention dims from an HF config.json dict (GPT-2, Llama-style or DeepSeek-V2/V3 keys)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{name}: expected a JSON object (an HF config.json), got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), dict) and "num_attention_heads" not in cfg:
        cfg = cfg["text_config"]  # multimodal configs nest the language model's

    def get(*keys, default=None):
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
        if default is None:
            raise ConfigError(f"{name} has no {' / '.join(keys)}: expected an HF config.json of a decoder model")
        return default

    n_layers = _checks.positive_int("num_hidden_layers", get("num_hidden_layers", "n_layer", "num_layers"))
    n_heads = _checks.positive_int("num_attention_heads", get("num_attention_heads", "n_head"))
    if cfg.get("kv_lora_rank"):
        nope = _checks.positive_int("qk_nope_head_dim", get("qk_nope_head_dim"))
        return AttentionDims(
            name, n_layers, n_heads, n_heads, nope,
            kv_lora_rank=_checks.positive_int("kv_lora_rank", get("kv_lora_rank")),
            qk_rope_head_dim=_checks.positive_int("qk_rope_head_dim", get("qk_rope_head_dim")),
            qk_nope_head_dim=nope,
            v_head_dim=_checks.positive_int("v_head_dim", get("v_head_dim")),
        )
    n_kv_heads = _checks.positive_int("num_key_value_heads", get("num_key_value_heads", "n_kv_heads", default=n_heads))
    _checks.divisible("num_attention_heads", n_heads, "num_key_value_heads", n_kv_heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        hidden = _checks.positive_int("hidden_size", get("hidden_size", "n_embd", "d_model"))
        _checks.divisible("hidden_size", hidden, "num_attention_heads", n_heads)
        head_dim = hidden // n_heads
    return AttentionDims(name, n_layers, n_heads, n_kv_heads, _checks.positive_int("head_dim", head_dim))


def load_dims(model: str | None = None, config: str | pathlib.Path | None = None) -> list[AttentionDims]:
    """Dims of one built-in model, of an HF config.json file, or (neither given) of every built-in."""
    if model is not None and config is not None:
        raise ConfigError("pass either model or config, not both")
    if config is not None:
        path = pathlib.Path(config)
        if not path.is_file():
            raise ConfigError(f"config={str(path)!r} is not a file: expected the path of an HF config.json")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config={str(path)!r} is not valid JSON: {err}") from None
        return [dims_from_config(cfg, path.name)]
    if model is None:
        return [dims_from_config(cfg, name) for name, cfg in BUILTIN_CONFIGS.items()]
    _checks.one_of("model", model, tuple(BUILTIN_CONFIGS))
    return [dims_from_config(BUILTIN_CONFIGS[model], model)]


def _gqa_groups(dims: AttentionDims) -> int:
    """The model's own KV-head count if it is GQA, else n_h/4 groups (Llama-3's ratio) or fewer."""
    if dims.kind == "GQA":
        return dims.n_kv_heads
    return max(d for d in range(1, dims.n_heads // 4 + 1) if dims.n_heads % d == 0) if dims.n_heads >= 4 else 1


def _variants(dims: AttentionDims) -> list[tuple[str, str, str, object]]:
    """(kind, dims, formula, cache factory) per variant at these dims."""
    d_h, n_h = dims.head_dim, dims.n_heads
    n_g = _gqa_groups(dims)
    mla = _mla_dims(dims)
    d_c, d_r = mla["kv_lora_rank"], mla["qk_rope_head_dim"]
    shown = f"d_c={d_c}, d_h^R={d_r}" if dims.kind == "MLA" else f"d_c=4·d_h={d_c}, d_h^R=d_h/2={d_r}"
    rows = [
        ("MHA", f"n_h={n_h}, d_h={d_h}", "2·n_h·d_h", lambda dt: KVCache(1, n_h, 4, d_h, dtype=dt)),
        ("GQA", f"n_g={n_g}, d_h={d_h}", "2·n_g·d_h", lambda dt: KVCache(1, n_g, 4, d_h, dtype=dt)),
        ("MQA", f"d_h={d_h}", "2·d_h", lambda dt: KVCache(1, 1, 4, d_h, dtype=dt)),
        ("MLA", shown, "d_c + d_h^R", lambda dt: LatentKVCache(1, 4, d_c, d_r, dtype=dt)),
    ]
    if dims.kind == "MLA":
        k_dim = dims.qk_nope_head_dim + d_r
        rows.append(("MLA naive", f"n_h={n_h}, K {k_dim}, V {dims.v_head_dim}", "n_h·(d_h + d_h^R + d_v)",
                     lambda dt: KVCache(1, n_h, 4, k_dim, dims.v_head_dim, dtype=dt)))
    return rows


def _formula_elements(dims: AttentionDims, kind: str) -> int:
    """DeepSeek-V2 Table 1, per token and layer."""
    d_h, n_h = dims.head_dim, dims.n_heads
    if kind == "MHA":
        return kv_elements_per_token(n_h, d_h)
    if kind == "GQA":
        return kv_elements_per_token(_gqa_groups(dims), d_h)
    if kind == "MQA":
        return kv_elements_per_token(1, d_h)
    if kind == "MLA":
        mla = _mla_dims(dims)
        return latent_elements_per_token(mla["kv_lora_rank"], mla["qk_rope_head_dim"])
    return kv_elements_per_token(n_h, dims.qk_nope_head_dim + dims.qk_rope_head_dim, dims.v_head_dim)  # MLA naive


def _mla_dims(dims: AttentionDims) -> dict:
    """The model's own MLA dims, or DeepSeek's ratios at its head size for a model without MLA."""
    if dims.kind == "MLA":
        return dict(kv_lora_rank=dims.kv_lora_rank, qk_rope_head_dim=dims.qk_rope_head_dim)
    return mla_dims(dims.head_dim)


def _measure(factory, dtype: torch.dtype) -> int:
    """Bytes per token actually held by an attnlab cache after writing tokens into it."""
    cache = factory(dtype)
    tokens = 3
    if isinstance(cache, LatentKVCache):
        cache.update(torch.zeros(1, tokens, cache.kv_lora_rank, dtype=dtype),
                     torch.zeros(1, tokens, cache.qk_rope_head_dim, dtype=dtype))
    else:
        cache.update(torch.zeros(1, cache.n_kv_heads, tokens, cache.k_dim, dtype=dtype),
                     torch.zeros(1, cache.n_kv_heads, tokens, cache.v_dim, dtype=dtype))
    return cache.bytes() // tokens


def parse_dtype(dtype: str) -> torch.dtype:
    _checks.one_of("dtype", dtype, tuple(DTYPES))
    return DTYPES[dtype]


def kv_table(model: str | None = None, config: str | pathlib.Path | None = None, *, context: int = 4096,
             dtype: str = "bf16") -> list[KVRow]:
    """Rows of the KV-cache comparison for the chosen model(s), at ``context`` tokens in ``dtype``."""
    _checks.positive_int("context", context)
    torch_dtype = parse_dtype(dtype)
    size = torch_dtype.itemsize
    rows = []
    for dims in load_dims(model, config):
        for kind, shape, formula, factory in _variants(dims):
            elements = _formula_elements(dims, kind)
            per_model = elements * size * dims.n_layers
            rows.append(KVRow(
                model=dims.name, attention=kind, dims=shape, formula=formula, actual=kind == dims.kind, n_layers=dims.n_layers,
                elements_per_token_layer=elements, bytes_per_token_layer=elements * size,
                bytes_per_token=per_model, context=context, bytes_at_context=per_model * context,
                measured_bytes_per_token_layer=_measure(factory, torch_dtype),
            ))
    return rows


@dataclass(frozen=True)
class SmallModelRow:
    """Bytes held by the caches of a small stack of real attnlab attention layers after decoding."""

    attention: str
    n_layers: int
    tokens: int
    formula_bytes: int  # elements per token and layer · element size · layers · tokens
    measured_bytes: int  # sum of cache.bytes() over layers


def small_model_caches(*, dtype: str = "fp32", n_layers: int = 2, prompt: int = 12, new_tokens: int = 4,
                       seed: int = 0) -> list[SmallModelRow]:
    """Run a tiny n_layers stack of each attention variant (d_model 64, 8 heads of 8): prefill
    ``prompt`` tokens, then decode ``new_tokens`` one at a time; report what its caches hold."""
    torch_dtype = parse_dtype(dtype)
    _checks.positive_int("n_layers", n_layers)
    _checks.positive_int("prompt", prompt)
    _checks.non_negative_int("new_tokens", new_tokens)
    d_model, n_heads, head_dim = 64, 8, 8
    mla = mla_dims(head_dim)
    builders = {
        "MHA": (lambda: GroupedQueryAttention(d_model, n_heads, n_heads, rope=True),
                kv_elements_per_token(n_heads, head_dim)),
        "GQA (n_g=2)": (lambda: GroupedQueryAttention(d_model, n_heads, 2, rope=True), kv_elements_per_token(2, head_dim)),
        "MQA": (lambda: GroupedQueryAttention(d_model, n_heads, 1, rope=True), kv_elements_per_token(1, head_dim)),
        "MLA absorbed (latent cache)": (lambda: MultiHeadLatentAttention(d_model, n_heads, mode="absorbed", **mla),
                                        latent_elements_per_token(mla["kv_lora_rank"], mla["qk_rope_head_dim"])),
        "MLA naive (per-head K, V)": (lambda: MultiHeadLatentAttention(d_model, n_heads, mode="naive", **mla),
                                     kv_elements_per_token(n_heads, mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"],
                                                           mla["v_head_dim"])),
    }
    tokens = prompt + new_tokens
    x = torch.randn(1, tokens, d_model, generator=torch.Generator().manual_seed(seed)).to(torch_dtype)
    rows = []
    with torch.no_grad():
        for label, (build, elements) in builders.items():
            layers = [build().to(torch_dtype).eval() for _ in range(n_layers)]
            caches = [layer.new_cache(1, tokens) for layer in layers]
            for start, end in [(0, prompt)] + [(t, t + 1) for t in range(prompt, tokens)]:
                h = x[:, start:end]
                for layer, cache in zip(layers, caches):
                    h = h + layer(h, cache=cache)
            rows.append(SmallModelRow(label, n_layers, tokens, elements * torch_dtype.itemsize * n_layers * tokens,
                                      sum(cache.bytes() for cache in caches)))
    return rows


def _human(n: int) -> str:
    """Bytes in binary units, 3 significant digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


KV_HEADERS = ("model", "attention", "own", "dims", "per token & layer", "elements", "bytes",
              "attnlab cache", "all layers", "at context")
SMALL_HEADERS = ("attention", "layers", "tokens", "formula bytes", "attnlab cache bytes", "equal")


def kv_title(dtype: str, context: int) -> str:
    return (f"KV cache per token of one sequence in {dtype} (DeepSeek-V2 Table 1): per layer, measured in an "
            f"attnlab cache, all layers, and at {context:,} tokens; ★ = the model's own attention")


def table_cells(rows: list[KVRow], small: list[SmallModelRow]) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The two tables as strings, in KV_HEADERS and SMALL_HEADERS order (for text and Markdown)."""
    kv = [(r.model, r.attention, "★" if r.actual else "", r.dims, r.formula, f"{r.elements_per_token_layer:,}",
           f"{r.bytes_per_token_layer:,}", f"{r.measured_bytes_per_token_layer:,}", _human(r.bytes_per_token),
           _human(r.bytes_at_context)) for r in rows]
    sm = [(r.attention, str(r.n_layers), str(r.tokens), f"{r.formula_bytes:,}", f"{r.measured_bytes:,}",
           "yes" if r.formula_bytes == r.measured_bytes else "NO") for r in small]
    return kv, sm


def to_markdown(rows: list[KVRow], small: list[SmallModelRow], *, dtype: str) -> str:
    """Both tables as Markdown, with a line saying the context length and dtype."""
    kv, sm = table_cells(rows, small)

    def md(headers, cells):
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])

    context = rows[0].context if rows else 0
    return (f"{kv_title(dtype, context)}\n\n{md(KV_HEADERS, kv)}\n\n"
            f"Caches of a small attnlab model after prefill + decoding ({small[0].tokens if small else 0} tokens)\n\n"
            f"{md(SMALL_HEADERS, sm)}\n")
