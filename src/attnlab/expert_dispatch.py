"""The MoE layer's fast dispatch: every (token, expert) assignment sorted by expert once, the routed
SwiGLU experts run as grouped matmuls over the sorted rows, a chunk of experts at a time, and a
hand-written backward that walks the same sorted chunks.

Why this shape, measured on CPU (see benchmarks/results/moe.md): the matmuls are the same FLOPs as a
dense SwiGLU's, but an MoE moves top-k times more token rows (gathered inputs, outputs, their
gradients). Run as whole-layer passes those rows leave the cache between steps; chunk by chunk
(one core's L2 cache of rows) gather → w1|w3 → SiLU·up → w2 → scatter stay in cache, and the backward
recomputes the cheap parts (the gather, SiLU) instead of keeping them. w1 and w3 (gate and up) are
concatenated into one (E, d, 2·hidden) weight, so the first layer is one matmul per expert with twice
the columns, which small experts run at a better rate. The custom ``autograd.Function`` also spares
torch._grouped_mm's autograd backward, which on CPU reads each group offset back with ``.item()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab import device


def sort_by_expert(indices: torch.Tensor, counts: torch.Tensor,
                   capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments grouped by expert: (order into the flat (N·k,) assignments, tokens kept per expert).

    Within an expert, earlier tokens come first (a stable sort), so a capacity keeps each expert's
    earliest tokens in flattened batch order, as the reference loop does.
    """
    flat = indices.flatten()  # (N*k,) expert of each (token, slot)
    order = torch.argsort(flat, stable=True)
    if capacity is None:
        return order, counts
    starts = counts.cumsum(0) - counts  # (E,) where each expert's block begins in `order`
    rank = torch.arange(order.numel(), device=order.device) - starts[flat[order]]  # place within its expert
    return order[rank < capacity], counts.clamp(max=capacity)


# Rows per chunk of experts: the forward and the backward run gather → matmuls → scatter one chunk at a time
# so a chunk's token rows (this many bytes of them) stay in cache between the steps that reuse them. None (the
# default) sizes a chunk as one core's L2 cache (device.l2_cache_bytes()), because the best size followed it
# (fp32, 1 thread, fwd+bwd, side by side):
# - Intel Xeon, 2 MiB L2: 64 experts × 32 top-6 + 1 shared on 4×512 tokens took 34.5 ms in 2 MiB chunks, 36.3 in
#   512 KiB, 37.0 in 256 KiB, 42.8 in one; at 384 tokens and on the compare's MoE the sizes were within noise.
# - AMD EPYC, 1 MiB L2: the fine-grained MoE on 2,048 tokens took 30.6 ms in 2 MiB chunks, 25.9 in 1 MiB, 25.5 in
#   768 KiB, 25.8 in 512 KiB (with a shared expert on 4×512: 30.6, 27.6, 28.4, 28.4); at 384 tokens within noise.
CHUNK_BYTES: int | None = None


def routed_experts(x: torch.Tensor, slot_weights: torch.Tensor, token: torch.Tensor, counts: torch.Tensor,
                   w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Σ over kept assignments of slot_weight · expert(x[token]), scattered back to (N, d).

    x (N, d); slot_weights (M,) and token (M,) for the M kept assignments sorted by expert, counts (E,)
    rows per expert; w1, w3 (E, hidden, d) and w2 (E, d, hidden) in the compute dtype.
    """
    sizes = counts.tolist()  # the one host sync: chunk bounds and the per-expert loop need them
    chunks = expert_chunks(sizes, x.shape[1] * x.element_size())
    grouped = _grouped_mm_applies(x, x.shape[1], w1.shape[1])
    return _SortedExperts.apply(x, slot_weights, token, (sizes, chunks, grouped), w1, w2, w3)


def expert_chunks(sizes: list[int], row_bytes: int, budget: int | None = None) -> list[tuple[int, int, int, int]]:
    """Consecutive experts grouped until their rows fill ``budget`` bytes: (first expert, end expert, first row,
    end row) each, covering every expert (experts with no row ride along in a chunk)."""
    if budget is None:
        budget = CHUNK_BYTES if CHUNK_BYTES is not None else device.l2_cache_bytes()
    chunks, first_expert, first_row, row = [], 0, 0, 0
    for expert, size in enumerate(sizes):
        row += size
        if (row - first_row) * row_bytes >= budget or expert == len(sizes) - 1:
            chunks.append((first_expert, expert + 1, first_row, row))
            first_expert, first_row = expert + 1, row
    return chunks


def _times(a: torch.Tensor, w: torch.Tensor, sizes: list[int], grouped: bool) -> torch.Tensor:
    """a (R, in) sorted by expert with sizes[e] rows each, w (E, in, out) -> (R, out): block e of a times w[e]."""
    if grouped:
        return torch._grouped_mm(a, w, offs=_offsets(sizes, a.device))
    out = a.new_empty(a.shape[0], w.shape[-1])
    for ae, we, oe in zip(a.split(sizes), w.unbind(0), out.split(sizes)):
        torch.mm(ae, we, out=oe)
    return out


def _outer(a: torch.Tensor, b: torch.Tensor, sizes: list[int], grouped: bool) -> torch.Tensor:
    """a (R, p), b (R, q) sorted by expert -> (E, p, q): block eᵀ of a times block e of b (a weight gradient)."""
    if grouped:
        return torch._grouped_mm(a.t(), b, offs=_offsets(sizes, a.device))
    out = a.new_empty(len(sizes), a.shape[1], b.shape[1])
    for ae, be, oe in zip(a.split(sizes), b.split(sizes), out.unbind(0)):
        torch.mm(ae.t(), be, out=oe)
    return out


def _offsets(sizes: list[int], device) -> torch.Tensor:
    ends, total = [], 0
    for size in sizes:
        total += size
        ends.append(total)
    return torch.tensor(ends, dtype=torch.int32, device=device)  # end row of each expert's block


def _grouped_mm_applies(x: torch.Tensor, d_model: int, hidden: int) -> bool:
    """torch._grouped_mm runs on CPU for fp32/bf16/fp16 when every row stride is a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cpu" or x.dtype == torch.float64:
        return False
    return all(dim * x.element_size() % 16 == 0 for dim in (d_model, hidden))


class _SortedExperts(torch.autograd.Function):
    """Forward and backward of the routed experts over assignments sorted by expert, chunk by chunk."""

    @staticmethod
    def forward(ctx, x, slot_weights, token, layout, w1, w2, w3):
        hidden = w1.shape[1]
        w13 = torch.cat([w1, w3], dim=1).transpose(1, 2)  # (E, d, 2h): gate | up side by side
        w2t = w2.transpose(1, 2)  # (E, h, d)
        sizes, chunks, grouped = layout  # rows per expert, expert_chunks(sizes), torch._grouped_mm or a loop
        with torch.autocast(x.device.type, enabled=False):
            gates, ups, silus = [], [], []  # per chunk, each (m, h) and contiguous: kept for the backward
            y = x.new_zeros(x.shape)
            for e0, e1, r0, r1 in chunks:
                rows, block_sizes = token[r0:r1], sizes[e0:e1]
                pre = _times(x.index_select(0, rows), w13[e0:e1], block_sizes, grouped)  # (m, 2h)
                gate, up = pre[:, :hidden].contiguous(), pre[:, hidden:].contiguous()  # elementwise runs faster
                silu = F.silu(gate)
                act = silu * up  # (m, h)
                act.mul_(slot_weights[r0:r1].unsqueeze(-1))  # weight before w2: hidden < d_model
                y.index_add_(0, rows, _times(act, w2t[e0:e1], block_sizes, grouped))
                gates.append(gate)
                ups.append(up)
                silus.append(silu)
        ctx.save_for_backward(x, slot_weights, token, w13, w2t)
        ctx.chunks, ctx.sizes, ctx.grouped = chunks, sizes, grouped
        ctx.per_chunk = list(zip(gates, ups, silus))  # intermediates: kept per chunk, no copy into one tensor
        return y

    @staticmethod
    def backward(ctx, dy):
        x, slot_weights, token, w13, w2t = ctx.saved_tensors
        chunks, sizes, grouped, hidden = ctx.chunks, ctx.sizes, ctx.grouped, w2t.shape[1]
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(x.dtype)
            dx = dy.new_zeros(dy.shape) if ctx.needs_input_grad[0] else None
            dslot = slot_weights.new_empty(slot_weights.shape)
            dw13, dw2 = [], []  # per chunk: (e1 - e0, 2h, d), (e1 - e0, d, h)
            for (e0, e1, r0, r1), (gate, up, silu) in zip(chunks, ctx.per_chunk):
                rows, block_sizes, weight = token[r0:r1], sizes[e0:e1], slot_weights[r0:r1].unsqueeze(-1)
                dout = dy.index_select(0, rows)  # (m, d)
                act = silu * up
                dw2.append(_outer(dout, act * weight, block_sizes, grouped))
                dact = _times(dout, w2t[e0:e1].transpose(1, 2), block_sizes, grouped)  # (m, h) d(weighted act)
                torch.sum(dact * act, dim=-1, out=dslot[r0:r1])
                dact.mul_(weight)
                dpre = torch.cat([torch.ops.aten.silu_backward(dact * up, gate), dact.mul_(silu)], dim=1)  # (m, 2h)
                dw13.append(_outer(dpre, x.index_select(0, rows), block_sizes, grouped))
                if dx is not None:
                    dx.index_add_(0, rows, _times(dpre, w13[e0:e1].transpose(1, 2), block_sizes, grouped))
        ctx.per_chunk = None
        dw13 = dw13[0] if len(dw13) == 1 else torch.cat(dw13)
        dw2 = dw2[0] if len(dw2) == 1 else torch.cat(dw2)
        return dx, dslot, None, None, dw13[:, :hidden], dw2, dw13[:, hidden:]
