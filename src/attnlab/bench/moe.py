"""MoE layer speed, forward+backward: the fast dispatch (assignments sorted by expert once, padded
batched matmuls, a backward that reuses the sort) against DeepSeek's reference loop over experts
and against a dense SwiGLU FFN with the same number of *active* parameters ((top-k + shared) ×
expert_hidden hidden units), in four cases: the compare command's MoE, a DeepSeek-style fine-grained MoE
at two token counts, and the fine-grained one with a shared expert on a (4, 512) batch. Each case also
states its FLOP floor: the layer's model FLOPs at this machine's measured matmul GFLOP/s."""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from attnlab import _checks, expert_dispatch
from attnlab import device as devices
from attnlab.bench.attention import time_case
from attnlab.bench.flops import moe_flops_per_token, swiglu_flops_per_token
from attnlab.bench.results import BenchReport, Table, fmt_ratio
from attnlab.compare.run import MOE_SHARED, MOE_TOP_K, CompareConfig
from attnlab.ffn import MoE, SwiGLU
from attnlab.timing import median_seconds

FAST = "MoE, fast dispatch"
REFERENCE = "MoE, reference dispatch"
DENSE = "dense SwiGLU, same active params"
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class MoECase:
    """One MoE layer and input shape to time, with the issue's bound on fast ÷ dense (None: only ≤ reference)."""

    name: str
    d_model: int
    n_routed_experts: int
    n_activated_experts: int
    expert_hidden: int
    n_shared_experts: int
    shape: tuple[int, ...]  # input shape without d_model: (tokens,) or (batch, seq)
    score_func: str = "softmax"
    dense_target: float | None = None

    @property
    def tokens(self) -> int:
        return int(torch.Size(self.shape).numel())

    def scaled(self, **sizes) -> MoECase:
        return MoECase(**{**self.__dict__, **sizes})


def _compare_case(tokens: int) -> MoECase:
    """The compare command's MoE members: its d_model, routed experts, top-k, shared experts and widths."""
    cfg = CompareConfig()
    return MoECase("compare's MoE", cfg.d_model, cfg.n_routed_experts, MOE_TOP_K,
                   cfg.ffn_hidden // (MOE_SHARED + MOE_TOP_K), MOE_SHARED, (tokens,), "sigmoid", 1.5)


CASES = (
    _compare_case(2048),
    MoECase("fine-grained", 128, 64, 6, 32, 0, (2048,), dense_target=1.5),
    MoECase("fine-grained", 128, 64, 6, 32, 0, (384,), dense_target=2.0),
    MoECase("fine-grained + 1 shared", 128, 64, 6, 32, 1, (4, 512)),
)


def run_moe(*, cases=CASES, peak_gflops: float, dtypes=("fp32",), repeats: int = 15, warmup: int = 2,
            reference: bool = True, device: str | torch.device = "cpu", progress=None) -> list[dict]:
    """Time fast vs reference dispatch vs the dense FFN, forward+backward, per case and dtype.

    ``peak_gflops`` is this machine's fp32 matmul ceiling (bench/peak.py) for the FLOP floor. The input
    requires its gradient, as an FFN's input does inside a model. One dict per (case, dtype, variant).
    """
    _checks.positive_int("repeats", repeats)
    _checks.positive("peak_gflops", peak_gflops)
    for dtype in dtypes:
        _checks.one_of("dtype", dtype, DTYPES)
    device = torch.device(device)
    rows = []
    for case in cases:
        for dtype in dtypes:
            if progress:
                progress(f"moe: {case.name}, {'×'.join(map(str, case.shape))} tokens, {dtype}")
            rows += _run_case(case, dtype, peak_gflops, repeats, warmup, reference, device)
    return rows


def _run_case(case: MoECase, dtype: str, peak_gflops: float, repeats: int, warmup: int, reference: bool,
              device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    moe = MoE(case.d_model, case.n_routed_experts, case.n_activated_experts, case.expert_hidden,
              n_shared_experts=case.n_shared_experts, score_func=case.score_func).to(device)
    dense = SwiGLU(case.d_model, (case.n_activated_experts + case.n_shared_experts) * case.expert_hidden).to(device)
    x = torch.randn(*case.shape, case.d_model, device=device)
    with torch.no_grad():
        y_fast = moe(x)
        stats = moe.last_stats
        max_diff = None
        if reference:
            moe.dispatch = "reference"
            max_diff = (moe(x) - y_fast).abs().max().item()
            moe.dispatch = "fast"
    modules = {FAST: moe, REFERENCE: _ReferenceView(moe), DENSE: dense} if reference else {FAST: moe, DENSE: dense}
    per_token = {FAST: moe_flops_per_token(case.d_model, case.n_routed_experts, case.n_activated_experts,
                                           case.n_shared_experts, case.expert_hidden),
                 DENSE: swiglu_flops_per_token(case.d_model, dense.w1.out_features)}
    per_token[REFERENCE] = per_token[FAST]
    medians = time_case(modules, x.requires_grad_(), backward=True, autocast=dtype == "bf16",
                        repeats=repeats, warmup=warmup)
    matmuls = _matmuls_alone(moe, dense, x.detach(), torch.bfloat16 if dtype == "bf16" else x.dtype, repeats)
    rows = []
    for name, seconds in medians.items():
        work = 3 * per_token[name] * case.tokens  # forward + backward = 3 × forward
        floor = work / (peak_gflops * 1e9)
        rows.append(dict(case=case.name, shape=list(case.shape), tokens=case.tokens, d_model=case.d_model,
                         n_routed_experts=case.n_routed_experts, n_activated_experts=case.n_activated_experts,
                         expert_hidden=case.expert_hidden, n_shared_experts=case.n_shared_experts,
                         score_func=case.score_func, dense_target=case.dense_target, variant=name, dtype=dtype,
                         ms=seconds * 1e3, ratio=seconds / medians[DENSE], floor_ms=floor * 1e3,
                         vs_floor=seconds / floor, gflops=work / seconds / 1e9, peak_gflops=peak_gflops,
                         load_imbalance=stats["load_imbalance"], max_diff=max_diff,
                         matmuls_ms=matmuls.get(name, float("nan")) * 1e3))
    return rows


def _matmuls_alone(moe: MoE, dense: SwiGLU, x: torch.Tensor, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Median seconds of only the matmuls each layer's forward+backward runs, on ready operands.

    The fast MoE: for this input's routing, every batch's six ``bmm`` calls (w1|w3 and w2 forward; the w2 and
    w1|w3 weight gradients; the two input gradients) plus the shared experts' six matmuls; the dense FFN: its
    own six. No router, gather, scatter or elementwise work: what is left of the layer's time once those are
    gone, for the kernels this dispatch uses.
    """
    d = x.shape[-1]
    tokens = x.reshape(-1, d)
    with torch.no_grad():
        _, indices, _ = moe.gate(tokens)
        counts = torch.bincount(indices.flatten(), minlength=moe.n_routed_experts)
        _, kept = expert_dispatch.sort_by_expert(indices, counts, moe.capacity(tokens.shape[0]))
    sizes = kept.tolist()
    hidden = moe.expert_hidden
    batches = expert_dispatch.expert_batches(sizes, expert_dispatch.slot_bytes(d, hidden, torch.finfo(dtype).bits // 8))

    def operands(*shapes):
        return [torch.randn(*shape, dtype=dtype, device=x.device) for shape in shapes]

    moe_calls = []
    for members, width in batches:
        b = len(members)
        xs, w13, w2, act, dout, dpre = operands((b, width, d), (b, 2 * hidden, d), (b, d, hidden), (b, width, hidden),
                                                (b, width, d), (b, width, 2 * hidden))
        moe_calls += [(torch.bmm, xs, w13.transpose(1, 2)), (torch.bmm, act, w2.transpose(1, 2)),
                      (torch.bmm, dout.transpose(1, 2), act), (torch.bmm, dout, w2),
                      (torch.bmm, dpre.transpose(1, 2), xs), (torch.bmm, dpre, w13)]
    if moe.shared_experts is not None:
        moe_calls += _swiglu_calls(tokens.shape[0], d, moe.shared_experts.w2.in_features, operands)
    dense_calls = _swiglu_calls(tokens.shape[0], d, dense.w2.in_features, operands)
    times = {}
    for name, calls in ((FAST, moe_calls), (DENSE, dense_calls)):
        times[name] = median_seconds(lambda calls=calls: [op(a, b) for op, a, b in calls], warmup=2,
                                     repeats=repeats, device=x.device)
    return times


def _swiglu_calls(n: int, d: int, hidden: int, operands) -> list:
    """A SwiGLU FFN's six matmuls over n tokens, forward+backward, w1|w3 fused as in SwiGLU.fuse_projections."""
    xs, w13, w2, act, dout, dpre = operands((n, d), (2 * hidden, d), (d, hidden), (n, hidden), (n, d), (n, 2 * hidden))
    return [(torch.mm, xs, w13.t()), (torch.mm, act, w2.t()), (torch.mm, dout.t(), act), (torch.mm, dout, w2),
            (torch.mm, dpre.t(), xs), (torch.mm, dpre, w13)]


class _ReferenceView(torch.nn.Module):
    """The same MoE (same parameters) run through the reference dispatch."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        self.moe.dispatch = "reference"
        try:
            return self.moe(x)
        finally:
            self.moe.dispatch = "fast"


def _case_label(row: dict) -> str:
    shared = f" + {row['n_shared_experts']} shared" if row["n_shared_experts"] else ""
    return (f"{row['case']}: d_model {row['d_model']}, {row['n_routed_experts']} experts top-"
            f"{row['n_activated_experts']}{shared}, hidden {row['expert_hidden']}, {row['score_func']} router, "
            f"{'×'.join(map(str, row['shape']))} tokens, {row['dtype']}")


def moe_report(rows: list[dict]) -> BenchReport:
    """A table per (case, dtype) with the FLOP floor, the issue's targets marked met or missed, a chart."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_case_label(row), []).append(row)
    headers = ["variant", "ms", "÷ dense", "matmuls alone ms", "FLOP floor ms", "× floor", "GFLOP/s"]
    tables = [Table(label, headers, [[r["variant"], f"{r['ms']:.2f}", fmt_ratio(r["ratio"]), _ms(r.get("matmuls_ms")),
                                      f"{r['floor_ms']:.2f}", fmt_ratio(r["vs_floor"]), f"{r['gflops']:.0f}"]
                                     for r in group])
              for label, group in groups.items()]
    notes = []
    for label, group in groups.items():
        notes += _targets(label, {r["variant"]: r for r in group})
    first = rows[0]
    notes += [
        (f"- FLOP floor: the layer's model FLOPs (router + top-k routed + shared experts; the dense row: its own "
         f"three matmuls), forward+backward = 3 × forward, at this machine's fp32 matmul peak measured at the start "
         f"of the run, {first['peak_gflops']:.0f} GFLOP/s (bench/peak.py: the best (2048×2048)² matmul call)."),
        ("- the input requires its gradient (as an FFN's input does in a model), so every row computes dx too; "
         "weights at init (seed 0): max/mean expert load " + ", ".join(
             f"{label.split(':')[0]} {'×'.join(map(str, g[0]['shape']))}: {g[0]['load_imbalance']:.2f}"
             for label, g in groups.items()) + "."),
        ("- fast dispatch (attnlab/expert_dispatch.py): one stable argsort of the (token, slot) assignments by "
         "expert and one host sync for the counts; experts ranked by load and batched, each padded to its "
         f"batch's largest, a batch's rows within one core's L2 cache ({devices.l2_cache_bytes() // 1024} KiB here); "
         "per batch: "
         "gather the rows, w1|w3 as one torch.bmm, SiLU·up, gate weight, w2, index_add_ back; a hand-written "
         "backward walks the same batches. The reference loops over experts with torch.where, as DeepSeek-V3's "
         "code does."),
    ]
    diffs = [r["max_diff"] for r in rows if r["max_diff"] is not None]
    if diffs:
        notes.append(f"- largest |fast − reference| over any output here: {max(diffs):.1e}")
    return BenchReport(mode="moe", title="MoE layer vs dense SwiGLU, forward+backward", tables=tables, notes=notes,
                       figure=lambda path: _plot(groups, path), data=rows)


def _ms(value) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def _targets(label: str, by: dict) -> list[str]:
    fast, ref, dense = by[FAST], by.get(REFERENCE), by[DENSE]
    short = f"{label.split(':')[0]} {'×'.join(map(str, fast['shape']))} {fast['dtype']}"
    lines = []
    if fast["dense_target"] is not None:
        ok = "✅" if fast["ratio"] <= fast["dense_target"] else "❌"
        lines.append(f"- target, {short}: fast MoE takes {fast['ratio']:.2f}× the dense FFN's time "
                     f"(target ≤ {fast['dense_target']:g}×) {ok}")
    if ref is not None:
        ok = "✅" if fast["ms"] <= ref["ms"] else "❌"
        lines.append(f"- target, {short}: fast takes {fast['ms'] / ref['ms']:.2f}× the reference loop's time "
                     f"(target ≤ 1×) {ok}; dense takes {dense['ms']:.2f} ms")
    if not math.isnan(fast.get("matmuls_ms", float("nan"))):
        lines.append(f"- matmuls alone, {short}: the fast dispatch's own matmul calls take {fast['matmuls_ms']:.2f} ms "
                     f"({fast['matmuls_ms'] / dense['ms']:.2f}× the whole dense FFN, "
                     f"{fast['matmuls_ms'] / dense['matmuls_ms']:.2f}× its matmuls alone); routing, gathers, "
                     f"scatters and elementwise work take the other {fast['ms'] - fast['matmuls_ms']:.2f} ms")
    return lines


def _plot(groups: dict[str, list[dict]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["variant"] for g in groups.values() for r in g))
    labels = [f"{g[0]['case']}\n{'×'.join(map(str, g[0]['shape']))} tokens, {g[0]['dtype']}" for g in groups.values()]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(groups)))
    height = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r["ratio"] for r in g if r["variant"] == name), 0.0) for g in groups.values()]
        bars = ax.barh([j + i * height for j in range(len(groups))], values, height=height, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}×" if v else "" for v in values], fontsize=7, padding=2)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(groups))], labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("time ÷ dense SwiGLU with the same active parameters (forward+backward); lower is faster")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
