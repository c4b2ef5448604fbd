"""Normalisation layers shared by the models."""

import torch
from torch import nn


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in the weight's dtype and cast back, as Llama and DeepSeek do.

    Under bf16 autocast the input arrives in bf16 while the weight stays fp32; PyTorch then skips
    its fused kernel (with a warning on every call). Normalising in fp32 is both fused and exact.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype if self.weight is not None else torch.float32
        return super().forward(x.to(dtype)).to(x.dtype)
