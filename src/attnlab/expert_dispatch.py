"""The MoE layer's fast dispatch: every (token, expert) assignment sorted by expert once, the routed
SwiGLU experts run as padded batched matmuls (``torch.bmm``), a batch of experts at a time, and a
hand-written backward that walks the same batches.

Why this shape, measured on CPU (see benchmarks/results/moe.md): the matmuls are the same FLOPs as a
dense SwiGLU's, but an MoE moves top-k times more token rows (gathered inputs, outputs, their
gradients). Run as whole-layer passes those rows leave the cache between steps; batch by batch (one
core's L2 cache of rows) gather → w1|w3 → SiLU·up → w2 → scatter stay in cache, and the
backward recomputes the cheap parts (the gather, SiLU) instead of keeping them.

A batch holds experts of similar load (experts are ranked by their number of rows), each padded to
the batch's largest, so one ``bmm`` runs them all: padding is at most an eighth of a batch, and
``bmm`` splits its batch over the cores, where per-expert matmuls of 30–200 rows are each too small
to thread. Measured side by side with the earlier dispatch (``torch._grouped_mm`` per chunk of
consecutive experts) and the reference loop, fp32 fwd+bwd on a 2-core AMD EPYC (ms, this one /
grouped / reference):

- 2 threads: 64 experts × 32 top-6 on 2,048 tokens 16.8 / 17.0 / 34.3, on 384 tokens 5.6 / 6.9 / 18.6,
  with a shared expert on 4×512 18.2 / 19.1 / 36.3; the compare's MoE (8 × 128 top-2 + shared)
  17.8 / 19.6 / 18.7.
- 1 thread: 26.0 / 24.9 / 41.2, 9.8 / 8.9 / 17.4, 31.7 / 29.2 / 44.9, and 31.1 / 34.5 / 32.7: 4–10%
  behind on the fine-grained cases, ahead of both on the compare's.

Padding slots read a zero row and weigh 0, so they add nothing to any output or gradient. w1 and w3
(gate and up) run as one (d, 2·hidden) matmul per expert.
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


# Bytes of padded rows per batch of experts (a token row and its w1|w3 output, see slot_bytes): the forward and the
# backward run gather → matmuls → scatter one batch at a time so those rows stay in cache between the steps that
# reuse them. None (the default) is one core's L2 cache (device.l2_cache_bytes()). Measured (fp32, fwd+bwd, side
# by side, AMD EPYC with 1 MiB of L2, when a row's bytes counted only x), 64 experts × 32 top-6 on 2,048 tokens:
# 28.3 / 27.3 / 29.4 ms with all, half and a quarter of the L2 on 1 thread, 17.8 / 19.0 / 21.1 ms on 2 threads.
# The earlier per-chunk torch._grouped_mm dispatch had been fastest in 2 MiB chunks on an Intel Xeon with 2 MiB
# of L2 and in 1 MiB ones on this EPYC: the size follows the cache.
BATCH_BYTES: int | None = None


# At most this share of a batch's slots is padding. With the compare's MoE (8 experts × 128 on 2,048 tokens,
# 450–557 rows each, 1 thread) batches of three experts padded by 1–5% took 34.4 ms against 31.0 for the
# reference loop, and one expert per batch (what this cap and counting the w1|w3 output in a row's bytes give)
# 31.1; the fine-grained cases were within noise with the cap and without.
MAX_PADDING = 0.125


def batch_budget() -> int:
    """Bytes of padded token rows per batch of experts: BATCH_BYTES when set, else one core's L2 cache."""
    return BATCH_BYTES if BATCH_BYTES is not None else device.l2_cache_bytes()


def slot_bytes(d_model: int, hidden: int, element_size: int) -> int:
    """What one slot of a batch keeps in cache: its token row and its w1|w3 output row."""
    return (d_model + 2 * hidden) * element_size


def expert_batches(sizes: list[int], row_bytes: int, budget: int | None = None) -> list[tuple[list[int], int]]:
    """Experts with rows, fewest rows first, grouped while a batch's padded rows fit in ``budget`` bytes.

    Returns (experts, rows) per batch: each expert's block is padded to ``rows``, the batch's largest, and
    the batch runs as one batched matmul. Ordering by size keeps neighbours alike, so padding stays small;
    a batch closes before an expert that would take it over the budget or make padding more than
    MAX_PADDING of its slots (so padding never costs more than that share of any batch, and an expert
    larger than the budget is a batch of its own). Experts with no row are in no batch (their gradients
    are zero). When every batch is a single expert, they come in expert order: nothing to reorder.
    """
    budget = batch_budget() if budget is None else budget
    ranked = sorted((e for e, size in enumerate(sizes) if size), key=lambda e: sizes[e])  # stable: ties by id
    batches, members, held = [], [], 0
    for expert in ranked:
        padded = (len(members) + 1) * sizes[expert]
        if members and (padded * row_bytes > budget or padded - held - sizes[expert] > MAX_PADDING * padded):
            batches.append((members, sizes[members[-1]]))  # ascending sizes: the last member is the largest
            members, held = [], 0
        members.append(expert)
        held += sizes[expert]
    if members:
        batches.append((members, sizes[members[-1]]))
    if all(len(members) == 1 for members, _ in batches):
        batches.sort()
    return batches


def routed_experts(x: torch.Tensor, slot_weights: torch.Tensor, token: torch.Tensor, counts: torch.Tensor,
                   w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Σ over kept assignments of slot_weight · expert(x[token]), scattered back to (N, d).

    x (N, d); slot_weights (M,) and token (M,) for the M kept assignments sorted by expert, counts (E,)
    rows per expert; w1, w3 (E, hidden, d) and w2 (E, d, hidden) in the compute dtype.
    """
    sizes = counts.tolist()  # the one host sync: the batches are planned from it
    batches = expert_batches(sizes, slot_bytes(x.shape[1], w1.shape[1], x.element_size()))
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
        order = [e for members, _ in batches for e in members]
        in_place = order == list(range(w1.shape[0]))  # every expert, in expert order: no weight gather
        padded = slots.numel() > token.numel()  # else there is no zero row to read or write
        with torch.autocast(x.device.type, enabled=False):
            order = torch.tensor(order, dtype=torch.long, device=x.device)
            rows = torch.cat([token, token.new_full((1,), n)]).index_select(0, slots)  # padding: the zero row n
            weights = torch.cat([slot_weights, slot_weights.new_zeros(1)]).index_select(0, slots)  # padding: 0
            w13 = torch.cat([w1, w3], dim=1)  # (E, 2h, d)
            if not in_place:  # the experts with rows, in batch order
                w13, w2 = w13.index_select(0, order), w2.index_select(0, order)
            source = _with_zero_row(x) if padded else x
            y = x.new_zeros(n + padded, d)
            saved = []
            for e0, e1, s0, s1, shape in _spans(batches):
                pre = torch.bmm(source.index_select(0, rows[s0:s1]).view(*shape, d), w13[e0:e1].transpose(1, 2))
                gate, up = pre[..., :hidden], pre[..., hidden:]  # views: no copy
                silu = F.silu(gate)
                act = silu * up  # (B, C, h)
                act.mul_(weights[s0:s1].view(*shape, 1))  # weight before w2: hidden < d_model
                y.index_add_(0, rows[s0:s1], torch.bmm(act, w2[e0:e1].transpose(1, 2)).view(-1, d))
                saved.append((gate, up, silu))
        ctx.save_for_backward(source, slots, rows, weights, order, w13, w2)
        ctx.batches, ctx.in_place, ctx.shapes = batches, in_place, (slot_weights.shape[0], w1.shape[0], n, padded)
        ctx.per_batch = saved  # intermediates: kept per batch, no copy into one tensor
        return y[:n] if padded else y

    @staticmethod
    def backward(ctx, dy):
        source, slots, rows, weights, order, w13, w2 = ctx.saved_tensors
        (m, experts, n, padded), d, hidden = ctx.shapes, source.shape[1], w2.shape[2]
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(source.dtype)
            dy = _with_zero_row(dy) if padded else dy
            dx = source.new_zeros(n + padded, d) if ctx.needs_input_grad[0] else None
            dslot = source.new_empty(slots.numel())  # per padded slot, in batch order
            dw13, dw2 = source.new_empty(w13.shape), source.new_empty(w2.shape)  # per expert, in batch order
            for (e0, e1, s0, s1, shape), (gate, up, silu) in zip(_spans(ctx.batches), ctx.per_batch):
                weight = weights[s0:s1].view(*shape, 1)
                dout = dy.index_select(0, rows[s0:s1]).view(*shape, d)
                act = silu * up
                torch.bmm(dout.transpose(1, 2), act * weight, out=dw2[e0:e1])
                dact = torch.bmm(dout, w2[e0:e1])  # (B, C, h): d(weighted act)
                torch.sum(dact * act, dim=-1, out=dslot[s0:s1].view(shape))
                dact.mul_(weight)
                dpre = dact.new_empty(*shape, 2 * hidden)  # (B, C, 2h): d(gate) | d(up), written in place
                torch.ops.aten.silu_backward.grad_input(dact * up, gate, grad_input=dpre[..., :hidden])
                torch.mul(dact, silu, out=dpre[..., hidden:])
                torch.bmm(dpre.transpose(1, 2), source.index_select(0, rows[s0:s1]).view(*shape, d), out=dw13[e0:e1])
                if dx is not None:
                    dx.index_add_(0, rows[s0:s1], torch.bmm(dpre, w13[e0:e1]).view(-1, d))
            # back to assignment and expert order; padding slots all land on the extra entry m
            dslot = source.new_zeros(m + 1).index_copy_(0, slots, dslot)[:m]
            if not ctx.in_place:  # back to expert order; experts with no row get zeros
                dw13, dw2 = (_in_expert_order(g, order, experts) for g in (dw13, dw2))
        ctx.per_batch = None
        if dx is not None and padded:
            dx = dx[:n]
        return dx, dslot, None, None, dw13[:, :hidden], dw2, dw13[:, hidden:]


def _in_expert_order(grad: torch.Tensor, order: torch.Tensor, experts: int) -> torch.Tensor:
    """Per-expert gradients listed in ``order`` put back in expert order, zeros for experts not in it."""
    shape = (experts, *grad.shape[1:])
    out = grad.new_empty(shape) if order.numel() == experts else grad.new_zeros(shape)  # every row written, or not
    return out.index_copy_(0, order, grad)


def _spans(batches: list[tuple[list[int], int]]):
    """Per batch, in batch order: (first, end) expert position, (first, end) slot, and its (experts, rows) shape."""
    expert, slot = 0, 0
    for members, width in batches:
        yield expert, expert + len(members), slot, slot + len(members) * width, (len(members), width)
        expert, slot = expert + len(members), slot + len(members) * width
