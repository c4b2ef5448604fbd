"""Optimisers and the learning-rate schedule every trainer uses.

:func:`make_optimizer` gives an :class:`Optimization`: AdamW alone (decoupled weight decay on
matrices and embeddings, none on norms and biases), or Muon for the hidden matrices with AdamW for
the embeddings, the LM head, norms, biases, routers and stacked experts — as the modded-nanogpt
speedrun splits them. Every optimizer in it follows one warmup + cosine schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnlab import _checks

OPTIMIZERS = ("adamw", "muon")


class WarmupCosine:
    """LR multiplier: linear warmup to 1, cosine decay to min_ratio at decay_steps, then flat.
    A callable object (not a lambda) so LambdaLR can save and restore it."""

    def __init__(self, warmup_steps: int, decay_steps: int, min_ratio: float):
        self.warmup_steps, self.decay_steps, self.min_ratio = warmup_steps, decay_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step >= self.decay_steps:
            return self.min_ratio
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.min_ratio)


def newton_schulz(grad: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (Keller Jordan's), the orthogonalised update of
    ``grad`` computed in ``dtype``: bf16 where its matmuls are fast, fp32 where bf16 is emulated.
    ``grad`` is one matrix (m, n) or a stack of same-shape matrices (G, m, n), each orthogonalised on
    its own in batched matmuls (a small model's step pays per call, not per FLOP)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    multiply_add = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (same hyper-parameters, state and result) with its Newton-Schulz
    iteration in ``ns_dtype``: PyTorch runs it in bf16 always, which on a CPU without native bf16
    costs more than the whole training step."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad)) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)  # one call for all matrices, not one per matrix
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            # Matrices that are the same up to a transpose (w1 (h, d) and w2 (d, h)) share one batched
            # Newton-Schulz: tall ones are turned wide first, as newton_schulz would do for each alone.
            batches: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                key = (min(p.shape), max(p.shape), _rms_matching_scale(group["adjust_lr_fn"], p.shape))
                batches.setdefault(key, []).append(i)
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for (_, _, scale), members in batches.items():
                wide = [updates[i].mT if params[i].size(0) > params[i].size(1) else updates[i] for i in members]
                stacked = wide[0] if len(wide) == 1 else torch.stack(wide)
                ortho = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                ortho = ortho.to(params[members[0]].dtype)  # one cast for the batch, not one per matrix in the add
                ortho = [ortho] if len(wide) == 1 else ortho.unbind(0)
                ortho = [o.mT if params[i].size(0) > params[i].size(1) else o for i, o in zip(members, ortho)]
                torch._foreach_add_([params[i] for i in members], ortho, alpha=-lr * scale)
        return None


def _rms_matching_scale(adjust_lr_fn: str | None, shape) -> float:
    """Muon's per-matrix LR scale: Keller's √max(1, A/B), or Moonshot's 0.2·√max(A, B) that matches AdamW's RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def muon_parameters(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names for Muon, names for AdamW): Muon takes the 2-D weight matrices inside the transformer
    blocks (attention and FFN projections); AdamW the embeddings and LM head (lookup tables and a
    classifier, not hidden maps), norms, biases, MoE routers and stacked (3-D) expert weights."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = p.dim() == 2 and ".blocks." in f".{name}" and ".gate." not in f".{name}"
        (muon if hidden else adamw).append(name)
    return muon, adamw


class Optimization:
    """One or more optimizers and their schedules, stepped and checkpointed as one."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], schedule: WarmupCosine):
        self.optimizers = optimizers
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, schedule) for name, opt in optimizers.items()}

    @property
    def lr(self) -> float:
        """The learning rate of this step (the first optimizer's; all follow the same schedule)."""
        return next(iter(self.schedulers.values())).get_last_lr()[0]

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for scheduler in self.schedulers.values():
            scheduler.step()

    def state_dict(self) -> dict:
        return {name: {"optimizer": self.optimizers[name].state_dict(), "scheduler": self.schedulers[name].state_dict()}
                for name in self.optimizers}

    def load_state_dict(self, state: dict, decay_steps: int) -> None:
        """Restore every optimizer and schedule; ``decay_steps`` replaces the saved one (a resumed
        run may be given a longer budget)."""
        for name, saved in state.items():
            self.optimizers[name].load_state_dict(saved["optimizer"])
            self.schedulers[name].load_state_dict(saved["scheduler"])
            self.schedulers[name].lr_lambdas[0].decay_steps = decay_steps


def _adamw(params: dict[str, nn.Parameter], lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only (not on norms or biases)."""
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def make_optimizer(model: nn.Module, *, lr: float, adamw_lr: float | None = None, weight_decay: float = 0.1,
                   betas=(0.9, 0.99), kind: str = "adamw", warmup_steps: int = 0, decay_steps: int = 1,
                   min_ratio: float = 1.0, ns_dtype: torch.dtype = torch.float32) -> Optimization:
    """AdamW for everything, or Muon (Moonshot's RMS matching, so ``lr`` and ``weight_decay`` carry
    over from AdamW; Newton-Schulz in ``ns_dtype``) for the hidden matrices and AdamW (at ``adamw_lr``,
    default ``lr``: the speedrun gives embeddings a far higher rate than the matrices) for the rest;
    one schedule, a multiplier of each peak rate, for all."""
    _checks.one_of("optimizer", kind, OPTIMIZERS)
    params = dict(model.named_parameters())
    schedule = WarmupCosine(warmup_steps, decay_steps, min_ratio)
    if kind == "adamw":
        return Optimization({"adamw": _adamw({n: p for n, p in params.items() if p.requires_grad}, lr, weight_decay,
                                             betas)}, schedule)
    muon, adamw = muon_parameters(model)
    optimizers = {"adamw": _adamw({n: params[n] for n in adamw}, lr if adamw_lr is None else adamw_lr, weight_decay,
                                  betas)}
    if muon:
        optimizers["muon"] = Muon([params[n] for n in muon], lr=lr, weight_decay=weight_decay,
                                  adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype)
    return Optimization(optimizers, schedule)
