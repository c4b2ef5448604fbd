"""Fusing Linears that read the same input into one: for decoding, where every call costs, for good
(:func:`concat_linears`), or for one training step's matmuls (:func:`joint_linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.errors import ConfigError


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output is the given Linears' outputs side by side (their weights
    stacked by rows, biases concatenated), on their device and in their dtype. They must share
    in_features, dtype and whether they have a bias."""
    first = linears[0]
    if any(not isinstance(m, nn.Linear) for m in linears):
        raise ConfigError("concat_linears fuses nn.Linear modules only (fuse before quantizing)")
    if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in linears}) != 1:
        raise ConfigError("concat_linears needs Linears with the same in_features, dtype, device and bias setting")
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    fused.weight.requires_grad_(first.weight.requires_grad)
    return fused


def joint_linear(x: torch.Tensor, linears) -> torch.Tensor | None:
    """The outputs of plain ``nn.Linear`` modules that read ``x``, side by side, from one matmul over
    their weights concatenated on the fly; None where any is not a plain Linear (a quantized or
    adapted one), so the caller runs them one by one.

    The parameters stay separate (each its own optimizer state, Muon matrix and checkpoint entry);
    only the arithmetic is joint: one matmul forward and two backward instead of three and six, and
    under autocast one weight cast. Worth it for many tokens (training); at batch-1 decoding the
    concatenation would copy the weights every token, so callers fuse for good there instead."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    biases = [m.bias for m in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, torch.cat([m.weight for m in linears]), bias)
