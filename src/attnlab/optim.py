"""Optimisers and the learning-rate schedule every trainer uses."""

from __future__ import annotations

import math

import torch
from torch import nn


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.99)) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


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


def make_scheduler(optimizer, *, warmup_steps: int, decay_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, decay_steps, min_ratio))
