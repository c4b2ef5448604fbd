"""Tiny GPT decoders for the quantization and decoding tests, and the error measure they share."""

import torch

from attnlab.models.gpt import GPT, GPTConfig


def sharp_gpt(config: dict, seed: int) -> GPT:
    """A GPT in eval mode from ``config``, seeded, its LM head ×20: sharper logits than the 0.02 init,
    so greedy argmaxes are not near ties."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, in fp32."""
    return float((a.float() - b.float()).norm() / b.float().norm())
