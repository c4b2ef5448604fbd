"""One causal self-attention block (projections + attention + output projection), many ways.

Every row computes the same kind of block at the same shape: the lecture's two classes, attnlab's
fused MHA/GQA/MQA/MLA, PyTorch's ``nn.MultiheadAttention``, x-transformers' ``Attention`` and the
floor: three ``nn.Linear`` projections, ``F.scaled_dot_product_attention(is_causal=True)`` and the
output ``nn.Linear`` with nothing in between. Each case (seq, pass, dtype) times all rows
round-robin in one process, so a burst of noise hits every row alike and the ratios stay fair.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attnlab.attention.fuse import joint_linear
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.attention.lecture import MultiHeadAttention, MultiHeadAttentionWrapper
from attnlab.attention.mla import MultiHeadLatentAttention, mla_dims
from attnlab.bench.flops import gqa_flops, mla_flops
from attnlab.bench.peak import has_amx
from attnlab.bench.results import BenchReport, Table, fmt_ratio
from attnlab.timing import median_seconds, time_call

FLOOR = "floor: 3 Linear + SDPA + out Linear"
MHA_FUSED = "attnlab MHA (fused)"
PASSES = ("forward", "forward+backward")
NOISE = 1.05  # ratios closer than this are within run-to-run noise on a shared machine
DTYPES = ("fp32", "bf16")


class _Floor(nn.Module):
    """The least a causal MHA block can do: three projections (one matmul over their weights when
    training), PyTorch's fused kernel, the output."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        if self.training:  # one matmul over the three weights, as attnlab's modules train
            qkv = joint_linear(x, (self.q, self.k, self.v)).view(B, T, 3 * self.n_heads, C // self.n_heads)
            q, k, v = qkv.transpose(1, 2).split([self.n_heads] * 3, dim=1)
        else:
            q, k, v = (p(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                       for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class _TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` as a self-attention block with a causal mask."""

    def __init__(self, d_model: int, n_heads: int, seq: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False, attn_mask=self.mask, is_causal=True)[0]


class _LectureWrapperBlock(nn.Module):
    """The lecture's wrapper of independent causal heads, plus the output projection a block needs."""

    def __init__(self, d_model: int, n_heads: int, seq: int):
        super().__init__()
        self.heads = MultiHeadAttentionWrapper(d_model, d_model // n_heads, seq, 0.0, n_heads)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        return self.out(self.heads(x))


def _x_transformers(d_model: int, n_heads: int, seq: int) -> nn.Module:
    from x_transformers import Attention

    return Attention(d_model, dim_head=d_model // n_heads, heads=n_heads, causal=True, flash=True)


def _lecture_mha(d_model: int, n_heads: int, seq: int) -> nn.Module:
    return MultiHeadAttention(d_model, d_model, seq, 0.0, n_heads)


def _gqa(n_kv: int | None):
    def build(d_model: int, n_heads: int, seq: int) -> nn.Module:
        return GroupedQueryAttention(d_model, n_heads, n_kv_heads=n_heads if n_kv is None else n_kv)
    return build


def _mla(mode: str):
    def build(d_model: int, n_heads: int, seq: int) -> nn.Module:
        return MultiHeadLatentAttention(d_model, n_heads, mode=mode, **mla_dims(d_model // n_heads))
    return build


def _mha_flops(n_kv: int | None):
    def count(batch: int, seq: int, d_model: int, n_heads: int) -> int:
        return gqa_flops(batch, seq, d_model, n_heads, n_kv or n_heads)
    return count


def _mla_flops(mode: str):
    def count(batch: int, seq: int, d_model: int, n_heads: int) -> int:
        return mla_flops(batch, seq, d_model, n_heads, mode=mode, **mla_dims(d_model // n_heads))
    return count


@dataclass(frozen=True)
class Variant:
    """A row: how to build the block at (d_model, n_heads, seq) and how many FLOPs its forward needs."""

    name: str
    build: Callable[[int, int, int], nn.Module]
    flops: Callable[[int, int, int, int], int]
    requires: str | None = None  # the optional package it needs, named in the row when missing


VARIANTS = (
    Variant("lecture MultiHeadAttentionWrapper", _LectureWrapperBlock, _mha_flops(None)),
    Variant("lecture MultiHeadAttention", _lecture_mha, _mha_flops(None)),
    Variant(MHA_FUSED, _gqa(None), _mha_flops(None)),
    Variant("attnlab GQA (4 KV heads)", _gqa(4), _mha_flops(4)),
    Variant("attnlab MQA", _gqa(1), _mha_flops(1)),
    Variant("attnlab MLA naive", _mla("naive"), _mla_flops("naive")),
    Variant("attnlab MLA absorbed", _mla("absorbed"), _mla_flops("absorbed")),
    Variant("torch nn.MultiheadAttention", _TorchMHA, _mha_flops(None)),
    Variant("x-transformers Attention", _x_transformers, _mha_flops(None), requires="x-transformers"),
    Variant(FLOOR, lambda d, h, s: _Floor(d, h), _mha_flops(None)),
)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, backward: bool, autocast: bool):
    """One call of the block: a no-grad forward, or forward + backward into fresh parameter grads."""
    cast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast)
    if not backward:
        with torch.no_grad(), cast:
            module(x)
        return
    for p in module.parameters():
        p.grad = None
    with cast:
        y = module(x)
    y.backward(grad.to(y.dtype))


def time_case(modules: dict[str, nn.Module], x: torch.Tensor, *, backward: bool, autocast: bool,
              repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each module, timed round-robin after ``warmup`` calls each."""
    grad = torch.randn_like(x)
    for module in modules.values():
        for _ in range(warmup):
            _step(module, x, grad, backward, autocast)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, module in modules.items():
            times[name].append(time_call(lambda: _step(module, x, grad, backward, autocast), x.device))
    return {name: statistics.median(t) for name, t in times.items()}


def run_attention(*, peak: dict[str, float], batch: int = 4, seqs=(512, 2048), d_model: int = 768,
                  n_heads: int = 12, passes=PASSES, dtypes=DTYPES, repeats: int = 5, warmup: int = 1,
                  device: str | torch.device = "cpu", variants=VARIANTS, progress=None) -> list[dict]:
    """Time every variant for every (seq, pass, dtype) case; one dict per row and case.

    peak: GFLOP/s per dtype name ("fp32", "bf16") from :func:`attnlab.bench.peak.measure_peak`.
    A variant whose optional package is missing gets status "not installed" and no numbers.
    """
    device = torch.device(device)
    rows = []
    for seq in seqs:
        modules = {}
        for variant in variants:
            torch.manual_seed(0)
            try:
                modules[variant.name] = variant.build(d_model, n_heads, seq).to(device)
            except ImportError:
                continue  # reported as "not installed" below
        torch.manual_seed(0)
        x = torch.randn(batch, seq, d_model, device=device)
        for pass_ in passes:
            for dtype in dtypes:
                if progress:
                    progress(f"attention: seq {seq}, {pass_}, {dtype}")
                backward = pass_ != "forward"
                medians = time_case(modules, x, backward=backward, autocast=dtype == "bf16",
                                    repeats=repeats, warmup=warmup)
                floor = medians.get(FLOOR)
                for variant in variants:
                    row = dict(variant=variant.name, seq=seq, batch=batch, pass_=pass_, dtype=dtype)
                    if variant.name not in medians:
                        rows.append({**row, "status": f"{variant.requires} not installed"})
                        continue
                    seconds = medians[variant.name]
                    work = variant.flops(batch, seq, d_model, n_heads) * (3 if backward else 1)
                    gflops = work / seconds / 1e9
                    rows.append({**row, "status": "ok", "ms": seconds * 1e3,
                                 "ratio": seconds / floor if floor else None, "gflops": gflops,
                                 "pct_peak": 100 * gflops / peak[dtype] if peak.get(dtype) else None})
        del modules
    return rows


_BOOKKEEPING_OPS = {"empty", "empty_strided", "as_strided", "detach", "t", "view", "transpose", "expand", "select",
                    "slice", "unsqueeze", "_reshape_alias", "reshape", "resolve_conj", "resolve_neg", "_unsafe_view"}


class _OpCounter(TorchDispatchMode):
    """Counts every aten op that reaches the kernels (forward and backward), views left out."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _BOOKKEEPING_OPS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def aten_ops(module: nn.Module, x: torch.Tensor, *, backward: bool, autocast: bool) -> dict[str, int]:
    """How often each aten op that does work (not a view) runs in one call of the block."""
    grad = torch.ones_like(x)
    _step(module, x, grad, backward, autocast)  # first-call effects (lazy inits) stay out of the count
    with _OpCounter() as counter:
        _step(module, x, grad, backward, autocast)
    return counter.counts


def fused_mha_op_check(d_model: int = 64, n_heads: int = 4, seq: int = 16, passes=PASSES, dtypes=DTYPES) -> list[str]:
    """Trace attnlab's fused MHA and the floor per (pass, dtype): the same aten ops, as often, means
    every gap between them in the timings is Python overhead or machine noise."""
    torch.manual_seed(0)
    x = torch.randn(2, seq, d_model)
    mine, floor = _gqa(None)(d_model, n_heads, seq), _Floor(d_model, n_heads)
    lines = []
    for pass_ in passes:
        for dtype in dtypes:
            kw = dict(backward=pass_ != "forward", autocast=dtype == "bf16")
            ours, theirs = aten_ops(mine, x, **kw), aten_ops(floor, x, **kw)
            verdict = "the same aten ops as the floor ✅" if ours == theirs else (
                f"different aten ops from the floor ❌: {sorted(set(ours.items()) ^ set(theirs.items()))}")
            lines.append(f"- aten op trace, {pass_} {dtype}: attnlab MHA (fused) runs {verdict}")
    return lines


def sdpa_bf16_speedup(*, batch: int, seqs, d_model: int, n_heads: int, repeats: int = 3, device="cpu") -> list[str]:
    """Why bf16 autocast speeds the block up by what it does: the attention kernel alone, fp32 vs
    bf16 inputs, at each benchmarked shape (the projections follow the matmul peak)."""

    lines = []
    for seq in seqs:
        q, k, v = torch.randn(3, batch, n_heads, seq, d_model // n_heads, device=device).unbind(0)
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            args = [t.to(dtype) for t in (q, k, v)]
            times[dtype] = median_seconds(lambda: F.scaled_dot_product_attention(*args, is_causal=True),
                                          repeats=repeats, device=device)
        lines.append(f"- causal SDPA alone at T={seq}: fp32 {times[torch.float32] * 1e3:.1f} ms, bf16 "
                     f"{times[torch.bfloat16] * 1e3:.1f} ms ({times[torch.float32] / times[torch.bfloat16]:.2f}× faster)")
    amx = "has AMX" if has_amx() else "has no AMX (bf16 matmuls use AVX-512 BF16)"
    lines.append(f"- this CPU {amx}: bf16 autocast speeds the block up as much as its parts allow — the "
                 "projections by about the bf16 ÷ fp32 matmul peak, the attention kernel by the factor above.")
    return lines


def _case_key(row: dict) -> tuple:
    return row["seq"], row["pass_"], row["dtype"]


def attention_report(rows: list[dict], *, batch: int, d_model: int, n_heads: int, peak: dict[str, float],
                     extra_notes: list[str] = ()) -> BenchReport:
    """Tables per case, a ratio-to-floor overview, the targets (+ extra_notes) and a bar chart."""
    cases = list(dict.fromkeys(_case_key(r) for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], *_case_key(r)): r for r in rows}
    overview = Table(
        "Time ÷ floor (lower is faster; the floor is 3 Linear + SDPA + out Linear)",
        ["variant", *[f"T={s} {'fwd' if p == 'forward' else 'fwd+bwd'} {d}" for s, p, d in cases]],
        [[name, *[fmt_ratio(by[(name, *c)].get("ratio")) if by[(name, *c)]["status"] == "ok"
                  else by[(name, *c)]["status"] for c in cases]] for name in names],
    )
    tables = [overview]
    for seq, pass_, dtype in cases:
        body = []
        for name in names:
            r = by[(name, seq, pass_, dtype)]
            if r["status"] != "ok":
                body.append([name, r["status"], "", "", ""])
                continue
            pct = "" if r["pct_peak"] is None else f"{r['pct_peak']:.0f}%"
            body.append([name, f"{r['ms']:.1f}", fmt_ratio(r["ratio"]), f"{r['gflops']:.0f}", pct])
        tables.append(Table(f"batch {batch}, seq {seq}, {pass_}, {dtype}",
                            ["variant", "ms", "÷ floor", "GFLOP/s", "% of peak"], body))
    return BenchReport(
        mode="attention",
        title=f"Causal self-attention block: d_model {d_model}, {n_heads} heads, batch {batch}",
        tables=tables,
        notes=_targets(by, cases) + list(extra_notes) + [
            f"- peak (best matmul call, this machine, same run): fp32 {peak.get('fp32', 0):.0f} GFLOP/s, "
            f"bf16 {peak.get('bf16', 0):.0f} GFLOP/s. GFLOP/s counts the block's model FLOPs "
            "(projections + causal attention, fwd+bwd = 3× fwd; see attnlab.bench.flops).",
            f"- MLA dims: {mla_dims(d_model // n_heads)} (DeepSeek-V3's ratios at head_dim {d_model // n_heads}); "
            f"MLA also pays for RoPE and an RMSNorm, and absorbed MLA attends with {n_heads} heads over the "
            "(kv_lora_rank + rope)-wide latent: the form made for decoding, not for training. "
            "bf16 rows run under torch.autocast.",
        ],
        figure=lambda path: _plot(rows, cases, names, path),
        data=rows,
    )


def _targets(by: dict, cases: list) -> list[str]:
    """The issue's performance targets, each marked met or missed from this run's numbers."""
    lines = []

    def ratio(name, case):
        r = by.get((name, *case))
        return r.get("ratio") if r and r["status"] == "ok" else None

    for case in cases:
        label = f"T={case[0]} {case[1]} {case[2]}"
        mine = ratio(MHA_FUSED, case)
        if mine is None:
            continue
        checks = [f"{mine:.2f}× floor {'≤' if mine <= 1.10 else '>'} 1.10 {'✅' if mine <= 1.10 else '❌'}"]
        for other in ("torch nn.MultiheadAttention", "x-transformers Attention"):
            theirs = ratio(other, case)
            if theirs is not None:
                mark = "✅" if mine <= theirs else "≈" if mine <= NOISE * theirs else "❌"
                checks.append(f"vs {other.split()[0]} {mine / theirs:.2f}× {mark}")
        lines.append(f"- target, {label}: attnlab MHA {'; '.join(checks)}")
    lines.append(f"- ≈: slower by less than {NOISE - 1:.0%}, the run-to-run noise of rows that run the same aten "
                 "ops (see the trace below) on this machine; ✅/❌ compare the medians as they are.")
    for seq in dict.fromkeys(c[0] for c in cases):
        fp32, bf16 = by.get((MHA_FUSED, seq, "forward", "fp32")), by.get((MHA_FUSED, seq, "forward", "bf16"))
        if fp32 and bf16 and fp32["status"] == bf16["status"] == "ok":
            speedup = fp32["ms"] / bf16["ms"]
            lines.append(f"- target, T={seq} forward: bf16 autocast {speedup:.2f}× faster than fp32 "
                         f"(target ≥ 2× on AMX CPUs) {'✅' if speedup >= 2 else '❌'}")
    return lines


def _plot(rows, cases, names, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["variant"], *_case_key(r)): r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) * max(1, len(cases) / 4) + 1.5))
    height = 0.8 / len(cases)
    for i, case in enumerate(cases):
        values = [by[(n, *case)].get("ratio") or 0.0 for n in names]
        ax.barh([j + i * height for j in range(len(names))], values, height=height,
                label=f"T={case[0]} {case[1]} {case[2]}")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("time ÷ floor (SDPA + projections); lower is faster")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
