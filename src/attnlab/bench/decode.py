"""Token-by-token decoding speed with and without the KV cache, per attention variant.

One GPT size, greedy decoding at batch 1 after a prompt of ``context`` tokens. Cached: the prompt
is prefilled once, then each new token is one position through every layer. Recompute: each new
token runs the whole context again (what decoding without a cache costs). Steps of all variants
are timed round-robin, so machine noise hits them alike. Cache bytes per token come from the
caches themselves (``bytes_per_token()`` summed over layers).
"""

from __future__ import annotations

import statistics

import torch

from attnlab.attention.cache import KVCache, LatentKVCache
from attnlab.attention.mla import mla_dims
from attnlab.bench.results import BenchReport, Table, fmt_ratio
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.timing import time_call

VARIANTS = ("MHA", "GQA (4 KV heads)", "MQA", "MLA naive", "MLA absorbed")
# DeepSeek-V3: 128 heads of 128 dims (MHA baseline), latent 512 + RoPE key 64 (MLA, absorbed cache).
DEEPSEEK_V3 = dict(n_heads=128, head_dim=128, kv_lora_rank=512, qk_rope_head_dim=64)


def decode_config(variant: str, *, d_model: int, n_heads: int, n_layer: int, vocab_size: int, block_size: int):
    """The GPTConfig of one variant at the benchmark's model size (RoPE everywhere, as MLA needs it)."""
    common = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_heads,
                  d_model=d_model, positions="rope")
    if variant.startswith("MLA"):
        mode = "absorbed" if variant.endswith("absorbed") else "naive"
        return GPTConfig(attention="mla", mla_mode=mode, **mla_dims(d_model // n_heads), **common)
    kind = {"MHA": ("mha", None), "GQA (4 KV heads)": ("gqa", 4), "MQA": ("mqa", None)}[variant]
    return GPTConfig(attention=kind[0], n_kv_head=kind[1], **common)


@torch.inference_mode()
def run_decode(*, contexts=(256, 1024, 4096), d_model: int = 768, n_heads: int = 12, n_layer: int = 4,
               vocab_size: int = 256, new_tokens: int = 16, recompute_tokens: int = 3, variants=VARIANTS,
               device="cpu", progress=None) -> list[dict]:
    """Tokens/s of cached and recomputed greedy decoding per (variant, context); one dict each.

    new_tokens cached steps and recompute_tokens full recomputes are timed (after one untimed
    step each); the medians give tokens/s.
    """
    device = torch.device(device)
    block_size = max(contexts) + new_tokens + recompute_tokens + 2
    models = {}
    for variant in variants:
        torch.manual_seed(0)
        cfg = decode_config(variant, d_model=d_model, n_heads=n_heads, n_layer=n_layer,
                            vocab_size=vocab_size, block_size=block_size)
        models[variant] = GPT(cfg).to(device).eval()
    rows = []
    for context in contexts:
        if progress:
            progress(f"decode: context {context}")
        prompt = torch.randint(vocab_size, (1, context), generator=torch.Generator().manual_seed(context)).to(device)
        cached = {v: [] for v in variants}
        recomputed = {v: [] for v in variants}
        state = {}
        for variant, model in models.items():
            caches = model.new_caches(1, context + new_tokens + 1)
            logits, _ = model(prompt, caches=caches)  # prefill, not timed
            state[variant] = (caches, logits[:, -1:].argmax(-1))
        for step in range(new_tokens + 1):
            for variant, model in models.items():
                caches, token = state[variant]

                def one_step():
                    logits, _ = model(token, caches=caches)
                    state[variant] = (caches, logits[:, -1:].argmax(-1))

                seconds = time_call(one_step, device)
                if step:  # the first step is the warm-up
                    cached[variant].append(seconds)
        for step in range(recompute_tokens + 1):
            for variant, model in models.items():
                seq = torch.cat([prompt, prompt[:, :step]], dim=1)
                seconds = time_call(lambda: model(seq)[0][:, -1].argmax(-1), device)
                if step:
                    recomputed[variant].append(seconds)
        for variant in variants:
            caches = state[variant][0]
            per_token = sum(c.bytes_per_token() for c in caches)
            cached_tps = 1 / statistics.median(cached[variant])
            recompute_tps = 1 / statistics.median(recomputed[variant])
            rows.append(dict(variant=variant, context=context, cached_tps=cached_tps, recompute_tps=recompute_tps,
                             speedup=cached_tps / recompute_tps, cache_bytes_per_token=per_token,
                             cache_bytes_at_context=per_token * context, n_layer=n_layer,
                             cache_dtype=str(caches[0].dtype).removeprefix("torch.")))
    return rows


def deepseek_v3_cache_ratio(dtype=torch.bfloat16) -> dict:
    """Bytes per token and layer of attnlab's caches at DeepSeek-V3's dims: MHA vs MLA absorbed."""
    dims = DEEPSEEK_V3
    mha = KVCache(1, dims["n_heads"], 1, dims["head_dim"], dtype=dtype, device="meta").bytes_per_token()
    mla = LatentKVCache(1, 1, dims["kv_lora_rank"], dims["qk_rope_head_dim"], dtype=dtype,
                        device="meta").bytes_per_token()
    return {"mha": mha, "mla_absorbed": mla, "ratio": mha / mla}


def decode_report(rows: list[dict], *, d_model: int, n_heads: int, n_layer: int, vocab_size: int) -> BenchReport:
    body = [[r["variant"], f"{r['context']:,}", f"{r['cached_tps']:,.1f}", f"{r['recompute_tps']:,.2f}",
             fmt_ratio(r["speedup"]), f"{r['cache_bytes_per_token']:,}",
             f"{r['cache_bytes_at_context'] / 2**20:,.2f}"] for r in rows]
    table = Table(
        "Greedy decoding, batch 1: tokens/s with the KV cache and recomputing the context",
        ["variant", "context", "cached tok/s", "recompute tok/s", "cached ÷ recompute",
         f"cache B/token ({n_layer} layers)", "cache MiB at context"],
        body,
    )
    v3 = deepseek_v3_cache_ratio()
    notes = _targets(rows, v3) + [
        f"- model: GPT with {n_layer} layers, d_model {d_model}, {n_heads} heads, vocab {vocab_size}, RoPE, "
        f"fp32; MLA dims {mla_dims(d_model // n_heads)}; cache bytes are fp32 here.",
        f"- DeepSeek-V3 dims (128 heads × 128, latent 512 + RoPE 64), bf16, one layer: MHA cache "
        f"{v3['mha']:,} B/token, MLA absorbed {v3['mla_absorbed']:,} B/token ({v3['ratio']:.1f}× smaller).",
    ]
    return BenchReport(mode="decode", title="Decoding with and without the KV cache", tables=[table], notes=notes,
                       figure=lambda path: _plot(rows, path), data=rows)


def _targets(rows: list[dict], v3: dict) -> list[str]:
    lines = []
    by = {(r["variant"], r["context"]): r for r in rows}
    at_1k = [r for r in rows if r["context"] == 1024]
    if at_1k:
        worst = min(at_1k, key=lambda r: r["speedup"])
        ok = worst["speedup"] >= 10
        lines.append(f"- target: cached decode ≥ 10× recomputing at 1k context — slowest gain {worst['speedup']:.1f}× "
                     f"({worst['variant']}) {'✅' if ok else '❌'}")
    naive, absorbed = by.get(("MLA naive", 4096)), by.get(("MLA absorbed", 4096))
    if naive and absorbed:
        gain = absorbed["cached_tps"] / naive["cached_tps"]
        lines.append(f"- target: MLA absorbed decodes faster than MLA naive at 4k — {gain:.2f}× "
                     f"{'✅' if gain > 1 else '❌'}")
    lines.append(f"- target: MLA cache ≥ 7× smaller than MHA at DeepSeek-V3's dims — {v3['ratio']:.1f}× "
                 f"{'✅' if v3['ratio'] >= 7 else '❌'}")
    return lines


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = list(dict.fromkeys(r["context"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["context"]): r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in variants:
        left.plot(contexts, [by[(variant, c)]["cached_tps"] for c in contexts], marker="o", label=f"{variant} cached")
    left.plot(contexts, [by[(variants[0], c)]["recompute_tps"] for c in contexts], marker="x", linestyle="--",
              color="gray", label=f"{variants[0]} recompute")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("context (tokens)")
    left.set_ylabel("tokens/s (batch 1)")
    left.legend(fontsize=7)
    right.bar(variants, [by[(v, contexts[0])]["cache_bytes_per_token"] for v in variants])
    right.set_ylabel("cache bytes per token (whole model)")
    right.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
