"""Weight-only int8 for decoding: every ``nn.Linear`` of a model as int8 weights + one scale per
output channel, through PyTorch's own kernel ``torch.ops.aten._weight_int8pack_mm``.

Decoding at batch 1 is a chain of matrix-vector products: each token reads every weight once, so
its speed is bounded by memory bandwidth, and int8 weights read 4× fewer bytes than fp32 ones.
The weights are rounded symmetrically per output row (w ≈ q · s, q in [-127, 127], s = max|w_row|
/ 127); the activations stay floating point (no activation quantization, unlike
``torch.ao.quantization.quantize_dynamic``, whose int8 activations changed SmolLM2's greedy
tokens from the first one on). The kernel runs on bf16 activations: on the CPU (torch 2.13) its
bf16 path is the vectorised one — at batch 1 on a (1536×576) weight it measured 3× faster than
an fp32 ``F.linear``, its fp32 path 7× slower than that and its fp16 path 30× slower — so an
fp32 model's activations are rounded to bf16 on their way into each int8 Linear and the result
comes back in fp32. ``choose_quantization("auto")`` decides by timing one matrix-vector product
both ways on the machine at hand, once per process.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from attnlab import _checks
from attnlab.attention.mla import MultiHeadLatentAttention
from attnlab.errors import ConfigError
from attnlab.timing import best_seconds

QUANTIZE_CHOICES = ("none", "int8", "auto")
# int8 must beat the unquantized matrix-vector product by this much to be worth its rounding.
INT8_MIN_SPEEDUP = 1.2
# The probe: a (8192×4096) weight, 128 MiB in fp32 and 32 MiB in int8 — beyond the caches, as
# decoding's weights are, so it measures memory reads rather than cache hits.
_PROBE_SHAPE = (8192, 4096)
# Modules that read their Linears' float weights directly (MLA folds wkv_b into its queries in
# absorbed mode): their Linears stay as they are.
_READS_WEIGHTS = (MultiHeadLatentAttention,)


def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales float32 (out,)) with weight ≈ q * scales[:, None]: symmetric
    round-to-nearest per output row; an all-zero row gets scale 1 (q is 0 there anyway)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError("weight must be a floating 2-d tensor (out_features, in_features)")
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


class Int8Linear(nn.Module):
    """``nn.Linear`` with weight-only int8: y = (x @ q.T) * scales + bias, computed in
    ``compute_dtype`` (bf16 or fp16) and returned in the input's dtype, so the rest of the model
    (residual stream, norms, KV cache) keeps its own precision."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
            raise ConfigError("Int8Linear needs int8 weights (out, in) and one scale per output row (out,)")
        if compute_dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"compute_dtype={compute_dtype} is not allowed: expected torch.bfloat16 or torch.float16")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        q, scales = int8_weights(linear.weight)
        module = cls(q, scales, linear.bias, compute_dtype)
        return module.to(linear.weight.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this module multiplies by: q * scales (for checks and comparisons)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # (M, in)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)  # (M, out)
        else:  # no int8 kernel assumed elsewhere: dequantise on the fly (correct, not faster)
            y = F.linear(x2, self.qweight.to(self.compute_dtype)) * self.scales
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


def compute_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    """The kernel's activation dtype for a model in ``model_dtype``: fp16 for an fp16 model, else bf16
    (the CPU kernel's fast path; fp16 would keep 3 more mantissa bits, but runs 30× slower there)."""
    return torch.float16 if model_dtype == torch.float16 else torch.bfloat16


def quantize_int8(model: nn.Module, *, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every ``nn.Linear`` in ``model`` (in place) by an :class:`Int8Linear`; returns how many.

    A tied LM head gets its own int8 copy, so the embedding it shared keeps its float weights and
    the token lookup stays exact. Linears inside modules that read their weights directly (MLA)
    are left in float. ``compute_dtype`` defaults to :func:`compute_dtype_for` the model's dtype.
    The model is for inference from then on (int8 weights take no gradient)."""
    if compute_dtype is None:
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        compute_dtype = compute_dtype_for(dtypes.pop() if len(dtypes) == 1 else torch.float32)
    kept = {id(m) for reader in model.modules() if isinstance(reader, _READS_WEIGHTS) for m in reader.modules()}
    linears = [(parent, name, child) for parent in model.modules() if id(parent) not in kept
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in linears:
        setattr(parent, name, Int8Linear.from_linear(child, compute_dtype))
    return len(linears)


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every Linear's (or Int8Linear's) weights, scales
    and biases, each tensor once; embeddings count only where a Linear reads them (a tied LM head),
    since a token lookup reads one row."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            tensors = [module.weight, module.bias]
        elif isinstance(module, Int8Linear):
            tensors = [module.qweight, module.scales, module.bias]
        else:
            continue
        for t in tensors:
            if t is not None:
                seen[t.data_ptr()] = t.nbytes
    return sum(seen.values())


@functools.cache
def _int8_speedup(dtype: torch.dtype, threads: int) -> float:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*_PROBE_SHAPE, generator=generator).mul_(0.02)
    x = torch.randn(1, _PROBE_SHAPE[1], generator=generator)
    plain = weight.to(dtype)
    xd = x.to(dtype)
    int8 = Int8Linear(*int8_weights(weight), compute_dtype=compute_dtype_for(dtype))
    del weight
    with torch.inference_mode():
        best = {"plain": float("inf"), "int8": float("inf")}
        for _ in range(3):  # alternately, so a burst of load hits both alike
            best["plain"] = min(best["plain"], best_seconds(lambda: F.linear(xd, plain), repeats=3))
            best["int8"] = min(best["int8"], best_seconds(lambda: int8(xd), repeats=3))
    return best["plain"] / best["int8"]


def int8_speedup(dtype: torch.dtype = torch.float32) -> float:
    """How much faster a batch-1 matrix-vector product runs with int8 weights than with ``dtype``
    weights on this CPU (> 1: int8 is faster); measured once per process, dtype and thread count."""
    return _int8_speedup(dtype, torch.get_num_threads())


def choose_quantization(requested: str = "auto", device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """("none" or "int8", why) for decoding a model in ``dtype`` on ``device``: as asked, or for
    "auto" int8 only on a CPU where its matrix-vector product measured ≥ INT8_MIN_SPEEDUP × the
    ``dtype`` one (on CUDA "none": no int8 kernel is used there)."""
    _checks.one_of("quantize", requested, QUANTIZE_CHOICES)
    if requested != "auto":
        return requested, "asked for"
    if torch.device(device).type != "cpu":
        return "none", f"int8 is decoded with a CPU kernel only; {device} keeps {str(dtype).removeprefix('torch.')}"
    speedup = int8_speedup(dtype)
    name = str(dtype).removeprefix("torch.")
    if speedup >= INT8_MIN_SPEEDUP:
        return "int8", f"an int8 matrix-vector product measured {speedup:.1f}× faster than {name} here"
    return "none", (f"an int8 matrix-vector product measured {speedup:.2f}× {name}'s speed here, short of the "
                    f"{INT8_MIN_SPEEDUP}× that pays for int8's rounding")
