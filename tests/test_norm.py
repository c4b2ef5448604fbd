import warnings

import torch
from torch import nn

from attnlab.norm import RMSNorm


def test_equals_torch_rmsnorm_in_fp32():
    ours, ref = RMSNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_bf16_autocast_normalises_in_fp32_without_falling_back():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 16).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when it cannot use its fused kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = nn.functional.rms_norm(x.float(), (16,), norm.weight, norm.eps).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
