"""The MoE layer's fast dispatch: every (token, expert) assignment sorted by expert once, the routed
SwiGLU experts run as padded batched matmuls (``torch.bmm``), a batch of experts at a time, and a
hand-written backward that walks the same batches.

Why this shape, measured on CPU (see benchmarks/results/moe.md): the matmuls are the same FLOPs as a
dense SwiGLU's, but an MoE moves top-k times more token rows (gathered inputs, outputs, their
gradients). Run as whole-layer passes those rows leave the cache between steps; batch by batch (one
core's L2 cache of rows) gather → w1|w3 → SiLU·up → w2 → scatter stay in cache, and the
backward recomputes the cheap parts (the gather, SiLU) instead of keeping them.

A batch holds experts of similar load (experts are ranked by their number of rows), each padded to
the batch's largest, so one ``bmm`` runs them all: padding is a few percent, and ``bmm`` splits its
batch over the cores, where per-expert matmuls of 30–200 rows are each too small to thread. Measured
side by side against the earlier dispatch (``torch._grouped_mm`` per chunk of consecutive experts),
fp32 fwd+bwd on a 2-core AMD EPYC, 64 experts × 32 top-6: on 2 threads 6.5 ms against 7.5 at 384
tokens, 17.8 against 18.5 at 2,048, 17.3 against 19.1 with a shared expert on 4×512; on 1 thread it
is 3–6% slower (28.3 against 26.9 ms at 2,048). From 1 to 2 threads it gains 1.2–1.9× where the
per-expert matmuls gained 1.0–1.6×, and more cores widen that. Padding slots read a zero row and
weigh 0, so they add nothing to any output or gradient. w1 and w3 (gate and up) run as one
(d, 2·hidden) matmul per expert.
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


# Padded rows per batch of experts: the forward and the backward run gather → matmuls → scatter one batch at a
# time so its token rows (at most this many bytes of them) stay in cache between the steps that reuse them. None
# (the default) is one core's L2 cache (device.l2_cache_bytes()). Measured (fp32, fwd+bwd, side by side, AMD EPYC
# with 1 MiB of L2), 64 experts × 32 top-6 on 2,048 tokens: 28.3 / 27.3 / 29.4 ms with all, half and a quarter of
# the L2 on 1 thread, 17.8 / 19.0 / 21.1 ms on 2 threads; with a shared expert on 4×512 tokens, 2 threads: 17.3 /
# 19.1 / 21.3 ms. The earlier per-chunk torch._grouped_mm dispatch had been fastest in 2 MiB chunks on an Intel
# Xeon with 2 MiB of L2 and in 1 MiB ones on this EPYC: the size follows the cache.
CHUNK_BYTES: int | None = None


def batch_budget() -> int:
    """Bytes of padded token rows per batch of experts: CHUNK_BYTES when set, else one core's L2 cache."""
    return CHUNK_BYTES if CHUNK_BYTES is not None else device.l2_cache_bytes()


def expert_batches(sizes: list[int], row_bytes: int, budget: int | None = None) -> list[tuple[list[int], int]]:
    """Experts with rows, fewest rows first, grouped while a batch's padded rows fit in ``budget`` bytes.

    Returns (experts, rows) per batch: each expert's block is padded to ``rows``, the batch's largest, and
    the batch runs as one batched matmul. Ordering by size keeps neighbours alike, so padding stays small;
    a batch closes before an expert that would take it over the budget (an expert larger than the budget
    is a batch of its own, with no padding). Experts with no row are in no batch (their gradients are zero).
    """
    budget = batch_budget() if budget is None else budget
    ranked = sorted((e for e, size in enumerate(sizes) if size), key=lambda e: sizes[e])  # stable: ties by id
    batches, members = [], []
    for expert in ranked:
        if members and (len(members) + 1) * sizes[expert] * row_bytes > budget:
            batches.append((members, sizes[members[-1]]))  # ascending sizes: the last member is the largest
            members = []
        members.append(expert)
    if members:
        batches.append((members, sizes[members[-1]]))
    return batches


def routed_experts(x: torch.Tensor, slot_weights: torch.Tensor, token: torch.Tensor, counts: torch.Tensor,
                   w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Σ over kept assignments of slot_weight · expert(x[token]), scattered back to (N, d).

    x (N, d); slot_weights (M,) and token (M,) for the M kept assignments sorted by expert, counts (E,)
    rows per expert; w1, w3 (E, hidden, d) and w2 (E, d, hidden) in the compute dtype.
    """
    sizes = counts.tolist()  # the one host sync: the batches are planned from it
    batches = expert_batches(sizes, x.shape[1] * x.element_size())
    slots = _padded_slots(sizes, batches, token.device)
    return _BatchedExperts.apply(x, slot_weights, token, (batches, slots), w1, w2, w3)


def _padded_slots(sizes: list[int], batches: list[tuple[list[int], int]], dev) -> torch.Tensor:
    """For every padded slot of every batch, in batch order: the assignment it holds, or M (padding).

    Batch b is a (len(experts), rows) block of slots; row p of expert e holds assignment starts[e] + p
    while p < sizes[e]. Built with a few whole-tensor ops, not a loop over slots.
    """
    starts = [0] * len(sizes)
    total = 0
    for expert, size in enumerate(sizes):
        starts[expert], total = total, total + size
    experts = [e for members, _ in batches for e in members]
    widths = torch.tensor([rows for members, rows in batches for _ in members], dtype=torch.long, device=dev)
    block = torch.repeat_interleave(torch.arange(len(experts), device=dev), widths)  # (P,) block of each slot
    place = torch.arange(block.numel(), device=dev) - (widths.cumsum(0) - widths)[block]  # row within its block
    first = torch.tensor([starts[e] for e in experts], dtype=torch.long, device=dev)[block]
    size = torch.tensor([sizes[e] for e in experts], dtype=torch.long, device=dev)[block]
    return torch.where(place < size, first + place, total)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """t with one more row of zeros: where padded slots gather from and scatter to."""
    out = t.new_empty(t.shape[0] + 1, *t.shape[1:])
    out[:-1].copy_(t)
    out[-1].zero_()
    return out


class _BatchedExperts(torch.autograd.Function):
    """Forward and backward of the routed experts as padded batched matmuls, one batch of experts at a time.

    Everything a batch needs is gathered once for all batches, in batch order: each slot's token row and
    weight, and the experts' weights (w1|w3 side by side), so a batch takes contiguous slices of them.
    """

    @staticmethod
    def forward(ctx, x, slot_weights, token, plan, w1, w2, w3):
        batches, slots = plan
        n, d, hidden = x.shape[0], x.shape[1], w1.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            order = torch.tensor([e for members, _ in batches for e in members], dtype=torch.long, device=x.device)
            rows = torch.cat([token, token.new_full((1,), n)]).index_select(0, slots)  # padding: the zero row n
            weights = torch.cat([slot_weights, slot_weights.new_zeros(1)]).index_select(0, slots)  # padding: 0
            w13 = torch.cat([w1, w3], dim=1).index_select(0, order)  # (K, 2h, d), K experts with rows, batch order
            w2s = w2.index_select(0, order)  # (K, d, h)
            x_pad = _with_zero_row(x)
            y = x.new_zeros(n + 1, d)
            saved = []
            for (e0, e1, s0, s1), (members, width) in zip(_spans(batches), batches):
                shape = (len(members), width)
                weight = weights[s0:s1].view(*shape, 1)
                pre = torch.bmm(x_pad.index_select(0, rows[s0:s1]).view(*shape, d), w13[e0:e1].transpose(1, 2))
                gate, up = pre[..., :hidden].contiguous(), pre[..., hidden:].contiguous()  # elementwise runs faster
                silu = F.silu(gate)
                act = silu * up  # (B, C, h)
                act.mul_(weight)  # weight before w2: hidden < d_model
                y.index_add_(0, rows[s0:s1], torch.bmm(act, w2s[e0:e1].transpose(1, 2)).view(-1, d))
                saved.append((gate, up, silu))
        ctx.save_for_backward(x_pad, slots, rows, weights, order, w13, w2s)
        ctx.batches, ctx.shapes = batches, (slot_weights.shape[0], w1.shape[0])
        ctx.per_batch = saved  # intermediates: kept per batch, no copy into one tensor
        return y[:n]

    @staticmethod
    def backward(ctx, dy):
        x_pad, slots, rows, weights, order, w13, w2s = ctx.saved_tensors
        (m, experts), (n, d), hidden = ctx.shapes, (x_pad.shape[0] - 1, x_pad.shape[1]), w2s.shape[2]
        with torch.autocast(dy.device.type, enabled=False):
            dy_pad = _with_zero_row(dy.to(x_pad.dtype))
            dx = x_pad.new_zeros(n + 1, d) if ctx.needs_input_grad[0] else None
            dslot = x_pad.new_empty(slots.numel())  # per padded slot, in batch order
            dw13 = x_pad.new_empty(w13.shape)  # per expert in batch order
            dw2 = x_pad.new_empty(w2s.shape)
            for (e0, e1, s0, s1), (members, width), (gate, up, silu) in zip(_spans(ctx.batches), ctx.batches,
                                                                           ctx.per_batch):
                shape = (len(members), width)
                weight = weights[s0:s1].view(*shape, 1)
                dout = dy_pad.index_select(0, rows[s0:s1]).view(*shape, d)
                act = silu * up
                torch.bmm(dout.transpose(1, 2), act * weight, out=dw2[e0:e1])
                dact = torch.bmm(dout, w2s[e0:e1])  # (B, C, h): d(weighted act)
                torch.sum(dact * act, dim=-1, out=dslot[s0:s1].view(shape))
                dact.mul_(weight)
                dpre = torch.cat([torch.ops.aten.silu_backward(dact * up, gate), dact.mul_(silu)], dim=-1)  # (B, C, 2h)
                torch.bmm(dpre.transpose(1, 2), x_pad.index_select(0, rows[s0:s1]).view(*shape, d), out=dw13[e0:e1])
                if dx is not None:
                    dx.index_add_(0, rows[s0:s1], torch.bmm(dpre, w13[e0:e1]).view(-1, d))
            # back to assignment and expert order; padding slots all land on the extra entry m
            dslot_of = x_pad.new_zeros(m + 1).index_copy_(0, slots, dslot)
            dw13_of = x_pad.new_zeros(experts, 2 * hidden, d).index_copy_(0, order, dw13)  # experts with no row: 0
            dw2_of = x_pad.new_zeros(experts, d, hidden).index_copy_(0, order, dw2)
        ctx.per_batch = None
        return (dx[:n] if dx is not None else None, dslot_of[:m], None, None,
                dw13_of[:, :hidden], dw2_of, dw13_of[:, hidden:])


def _spans(batches: list[tuple[list[int], int]]):
    """(first, end) expert position and (first, end) slot of each batch, in batch order."""
    expert, slot = 0, 0
    for members, width in batches:
        yield expert, expert + len(members), slot, slot + len(members) * width
        expert, slot = expert + len(members), slot + len(members) * width
