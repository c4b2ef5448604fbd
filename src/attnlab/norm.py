"""Normalisation layers shared by the models."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in the weight's dtype and cast back, as Llama and DeepSeek do.

    Under bf16 autocast the input arrives in bf16 while the weight stays fp32; PyTorch then skips
    its fused kernel (with a warning on every call). Normalising in fp32 is both fused and exact.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype if self.weight is not None else torch.float32
        if x.dtype == dtype:  # the common case, called directly: decoding pays for every Python call
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return F.rms_norm(x.to(dtype), self.normalized_shape, self.weight, self.eps).to(x.dtype)
