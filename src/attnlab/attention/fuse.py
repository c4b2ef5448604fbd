"""Fusing Linears that read the same input into one, for decoding, where every call costs."""

from __future__ import annotations

import torch
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
