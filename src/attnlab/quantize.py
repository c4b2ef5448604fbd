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

Weight-only int4 (:class:`Int4Linear`, ``torch.ops.aten._weight_int4pack_mm_for_cpu``) stores each
group of 32 consecutive input weights of a row as 4-bit codes with a scale and an offset, w ≈ q·s + m
(q in 0..15, the group's min and max as the grid's ends). That is llama.cpp's Q4_1 block, so on
SmolLM2, whose GGUF holds its matrices as Q4_1, the codes, scales and offsets are recovered exactly
and only their bf16 storage in the kernel rounds (the scales to 8 significant bits); it reads half
of int8's bytes. The LM head (Q8_0 in SmolLM2's GGUF) gets 4-bit codes too, but only to rank the
vocabulary: :class:`RescoredHead` recomputes the best :data:`HEAD_CANDIDATES` logits of each position
in fp32 from the float rows, so the token picked does not hang on the kernel's bf16 output, whose
spacing of 0.125 at logits of 16–32 tied SmolLM2's top two tokens exactly. ``Int4Linear(planes=2)``
keeps 8 bits as two 4-bit planes of the same kernel (group-wise symmetric int8 codes c = 16·hi + lo,
w = c·d = (hi + 8 − 8)·16d + (lo − 8)·d + 8d, the input given twice), for a Linear that must keep them.
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

QUANTIZE_CHOICES = ("none", "int8", "int4", "auto")
# int8 (or int4) must beat the unquantized matrix-vector product by this much to be worth its rounding.
INT8_MIN_SPEEDUP = 1.2
# The CPU int4 kernel's constraints: groups of 32/64/128/256 input weights, output rows by 16.
INT4_GROUP = 32
INT4_GROUPS = (32, 64, 128, 256)
_INT4_ROWS = 16
HEAD_CANDIDATES = 16  # logits per position that RescoredHead recomputes in fp32
# A matrix is "already on a 4-bit grid" (int4 loses nothing but the bf16 rounding of its scales) when
# the codes rebuild it to this relative precision (fp32 arithmetic on Q4_1 values: a few ulps).
INT4_EXACT_RTOL = 1e-5
# The probe: a (8192×4096) weight, 128 MiB in fp32 and 32 MiB in int8 — beyond the caches, as
# decoding's weights are, so it measures memory reads rather than cache hits.
_PROBE_SHAPE = (8192, 4096)
# Modules that read their Linears' float weights directly (MLA folds wkv_b into its queries in
# absorbed mode): their Linears stay as they are.
_READS_WEIGHTS = (MultiHeadLatentAttention,)


def _check_matrix(weight) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError("weight must be a floating 2-d tensor (out_features, in_features)")
    return weight.detach().float()


def _as_linear_output(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """A quantized kernel's (M, out) result as nn.Linear would return it for x: x's dtype, bias added,
    x's leading dimensions."""
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], out_features)


def int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales float32 (out,)) with weight ≈ q * scales[:, None]: symmetric
    round-to-nearest per output row; an all-zero row gets scale 1 (q is 0 there anyway)."""
    w = _check_matrix(weight)
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
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # (M, in)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)  # (M, out)
        else:  # no int8 kernel assumed elsewhere: dequantise on the fly (correct, not faster)
            y = F.linear(x2, self.qweight.to(self.compute_dtype)) * self.scales
        return _as_linear_output(y, x, self.bias, self.out_features)

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
    are left in float. Linears that read one input are fused first (:func:`fuse_projections`: one
    kernel call for attention's q/k/v, one for SwiGLU's gate/up; rows are quantized each on its own, so
    the codes are the same). ``compute_dtype`` defaults to :func:`compute_dtype_for` the model's dtype.
    The model is for inference from then on (int8 weights take no gradient)."""
    fuse_projections(model)
    if compute_dtype is None:
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        compute_dtype = compute_dtype_for(dtypes.pop() if len(dtypes) == 1 else torch.float32)
    linears = _quantizable_linears(model)
    for parent, name, child in linears:
        setattr(parent, name, Int8Linear.from_linear(child, compute_dtype))
    return len(linears)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    _checks.one_of("group_size", group_size, INT4_GROUPS)
    out, inp = w.shape
    if inp % group_size:
        raise ConfigError(f"in_features={inp} is not a multiple of group_size={group_size}: int4 groups split rows evenly")
    return w.view(out, inp // group_size, group_size)


def int4_weights(weight: torch.Tensor, group_size: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 (out, in) in 0..15, scales float32 (out, groups), mins float32 (out, groups)) with
    weight ≈ codes · scale + min per group of ``group_size`` consecutive inputs: the group's min and
    max are the grid's ends (llama.cpp's Q4_1). A constant group gets scale 1 and codes 0."""
    groups = _groups(_check_matrix(weight), group_size)
    mins = groups.amin(dim=-1)
    scales = (groups.amax(dim=-1) - mins) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((groups - mins[..., None]) / scales[..., None]).clamp_(0, 15)
    return codes.view(weight.shape).to(torch.int32), scales, mins


def int8_group_weights(weight: torch.Tensor, group_size: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 (out, in) in -128..127, scales float32 (out, groups)) with weight ≈ codes · scale per
    group, symmetric (llama.cpp's Q8_0: scale = max|w| / 127); an all-zero group gets scale 1."""
    groups = _groups(_check_matrix(weight), group_size)
    scales = groups.abs().amax(dim=-1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(groups / scales[..., None]).clamp_(-128, 127)
    return codes.view(weight.shape).to(torch.int32), scales


def int4_fits(linear: nn.Linear, group_size: int = INT4_GROUP) -> bool:
    """Whether the CPU int4 kernel takes this Linear: in_features by group_size, out_features by 16."""
    return linear.in_features % group_size == 0 and linear.out_features % _INT4_ROWS == 0


class Int4Linear(nn.Module):
    """``nn.Linear`` with weight-only 4-bit codes on ``torch.ops.aten._weight_int4pack_mm_for_cpu``:
    y = x @ Wᵀ + bias with W rebuilt per group as (code − 8)·scale + zero, computed on bf16 activations
    (the kernel's fast path; its fp32 path measured 30× slower) and returned in the input's dtype.

    ``planes=2`` keeps 8 bits per weight as two 4-bit planes side by side along the input (the
    input is given twice): the high nibble with scale 16d, the low one with scale d (see the module
    docstring). Build with :meth:`from_linear`; CPU only (the packing is the CPU kernel's)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, planes: int = 1):
        super().__init__()
        _checks.one_of("group_size", group_size, INT4_GROUPS)
        _checks.one_of("planes", planes, (1, 2))
        out, width = codes.shape
        if (codes.dtype != torch.int32 or width % (group_size * planes) or out % _INT4_ROWS
                or scales.shape != (out, width // group_size) or zeros.shape != scales.shape):
            raise ConfigError(f"Int4Linear needs int32 codes (out, in) with out by {_INT4_ROWS} and in by "
                              f"group_size·planes, and scales/zeros (out, in // group_size)")
        self.group_size, self.planes = group_size, planes
        self.out_features, self.in_features = out, width // planes
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.cpu().contiguous(), 1))
        self.register_buffer("scale_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP, bits: int = 4) -> Int4Linear:
        """4 bits per weight (Q4_1-style codes, scale and min per group) or 8 (bits=8: group-wise int8 codes in two planes)."""
        _checks.one_of("bits", bits, (4, 8))
        if linear.weight.device.type != "cpu":
            raise ConfigError(f"int4 weights use a CPU kernel: the Linear is on {linear.weight.device}")
        if bits == 4:
            codes, scales, mins = int4_weights(linear.weight, group_size)
            return cls(codes, scales, mins + 8 * scales, group_size, linear.bias)
        codes8, d = int8_group_weights(linear.weight, group_size)
        d = d.to(torch.bfloat16).float()  # both planes' scales then hold the same rounded d exactly
        low = codes8 & 15
        high = (codes8 - low) // 16  # -8..7
        codes = torch.cat([high + 8, low], dim=1)
        return cls(codes, torch.cat([16 * d, d], dim=1), torch.cat([torch.zeros_like(d), 8 * d], dim=1),
                   group_size, linear.bias, planes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16, memory_format=torch.contiguous_format)  # (M, in)
        if self.planes == 2:
            x2 = torch.cat([x2, x2], dim=1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zeros)
        return _as_linear_output(y, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={4 * self.planes}, group_size={self.group_size}")


class RescoredHead(nn.Module):
    """An LM head that ranks the vocabulary with a quantized copy (``approx``) and then recomputes the
    ``candidates`` best logits of each position exactly, from the float ``weight`` rows (and ``bias``)
    in the input's dtype: k rows read per token, not the whole matrix. Greedy decoding then picks the
    argmax of exact logits whenever the true best token ranks among the approximate top k; the other
    logits keep the approximate values."""

    def __init__(self, approx: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 candidates: int = HEAD_CANDIDATES):
        super().__init__()
        _checks.positive_int("candidates", candidates)
        self.approx, self.candidates = approx, candidates
        self.weight = weight  # the float matrix (vocab, d): the tied embedding's own parameter, or the head's
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approx(x)  # (..., vocab)
        top = logits.topk(min(self.candidates, logits.size(-1)), dim=-1).indices  # (..., k)
        exact = (self.weight[top].to(x.dtype) @ x.unsqueeze(-1)).squeeze(-1)  # (..., k, d) @ (..., d, 1)
        if self.bias is not None:
            exact = exact + self.bias[top].to(x.dtype)
        return logits.scatter(-1, top, exact.to(logits.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, candidates={self.candidates}"


def on_int4_grid(weight: torch.Tensor, group_size: int = INT4_GROUP) -> bool:
    """Whether 4-bit group codes rebuild ``weight`` (to INT4_EXACT_RTOL of its largest entry): true of
    a matrix read from 4-bit blocks such as a GGUF's Q4_1, false of trained float weights."""
    w = _check_matrix(weight)
    codes, scales, mins = int4_weights(w, group_size)
    rebuilt = codes.view(_groups(w, group_size).shape) * scales[..., None] + mins[..., None]
    return bool((rebuilt.view(w.shape) - w).abs().max() <= INT4_EXACT_RTOL * w.abs().max().clamp_min(1e-30))


def int4_lossless(model: nn.Module, group_size: int = INT4_GROUP) -> bool:
    """Whether :func:`quantize_int4` would keep ``model``'s 4-bit matrices as they are (each one
    :func:`on_int4_grid`; the LM head, whose top candidates are rescored in float, and Linears the
    kernel cannot take aside)."""
    head = getattr(model, "lm_head", None)
    matrices = [child.weight for _, _, child in _quantizable_linears(model)
                if child is not head and int4_fits(child, group_size)]
    return bool(matrices) and all(on_int4_grid(w, group_size) for w in matrices)


def _inside_weight_readers(model: nn.Module) -> set[int]:
    """ids of the modules inside those that read their Linears' weights (MLA): left as they are."""
    return {id(m) for reader in model.modules() if isinstance(reader, _READS_WEIGHTS) for m in reader.modules()}


def _quantizable_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, Linear) for every Linear outside the modules that read their weights (MLA)."""
    kept = _inside_weight_readers(model)
    return [(parent, name, child) for parent in model.modules() if id(parent) not in kept
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def fuse_projections(model: nn.Module) -> int:
    """Fuse, in place, the Linears that read the same input in every module that can
    (``fuse_projections()``: attention's q/k/v, SwiGLU's gate/up), outside MLA; returns how many fused."""
    kept = _inside_weight_readers(model)
    fusable = [m for m in model.modules() if id(m) not in kept and hasattr(m, "fuse_projections")]
    for module in fusable:
        module.fuse_projections()
    return len(fusable)


def quantize_int4(model: nn.Module, *, group_size: int = INT4_GROUP) -> dict[str, int]:
    """Replace the Linears of a CPU ``model`` (in place) by :class:`Int4Linear`: 4 bits per weight.
    The LM head (``model.lm_head``, whose logits pick the token) becomes a :class:`RescoredHead`: its
    4-bit copy ranks the vocabulary and the top candidates are scored from its float weight (a tied
    head's is the embedding's, which keeps its float rows for the token lookup too). Linears the
    kernel cannot take (in_features not by group_size, out_features not by 16) become
    :class:`Int8Linear`, and MLA's stay float, as with :func:`quantize_int8`. Linears that read the
    same input (attention's q/k/v, SwiGLU's gate/up) are fused first (``fuse_projections``): one kernel
    call instead of three or two, the same codes, since groups run along rows. Returns how many became
    int4 and Int8Linear, and whether the head is rescored (1 or 0)."""
    fuse_projections(model)
    head = getattr(model, "lm_head", None)
    counts = {"int4": 0, "int8": 0, "rescored_head": 0}
    for parent, name, child in _quantizable_linears(model):
        if not int4_fits(child, group_size):
            setattr(parent, name, Int8Linear.from_linear(child))
            counts["int8"] += 1
            continue
        quantized = Int4Linear.from_linear(child, group_size)
        counts["int4"] += 1
        if child is head:
            quantized = RescoredHead(quantized, child.weight, child.bias)
            counts["rescored_head"] = 1
        setattr(parent, name, quantized)
    return counts


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
        elif isinstance(module, Int4Linear):
            tensors = [module.packed, module.scale_zeros, module.bias]
        else:
            continue
        for t in tensors:
            if t is not None:
                seen[t.data_ptr()] = t.nbytes
    return sum(seen.values())


@functools.cache
def _speedups(dtype: torch.dtype, threads: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(_PROBE_SHAPE[1], _PROBE_SHAPE[0], bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=generator)
    x = torch.randn(1, _PROBE_SHAPE[1], generator=generator).to(dtype)
    calls = {"plain": lambda: F.linear(x, plain)}
    plain = linear.weight.detach().to(dtype)
    int8 = Int8Linear.from_linear(linear, compute_dtype_for(dtype))
    calls["int8"] = lambda: int8(x)
    int4 = Int4Linear.from_linear(linear)
    calls["int4"] = lambda: int4(x)
    del linear
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for _ in range(3):  # in turns, so a burst of load hits each alike
            for name, call in calls.items():
                best[name] = min(best[name], best_seconds(call, repeats=3))
    return {name: best["plain"] / best[name] for name in ("int8", "int4")}


def quantized_speedups(dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """{"int8": ×, "int4": ×}: how much faster a batch-1 matrix-vector product runs with int8 / int4
    weights than with ``dtype`` weights on this CPU (> 1: faster); measured once per process, dtype
    and thread count."""
    return dict(_speedups(dtype, torch.get_num_threads()))


def choose_quantization(requested: str = "auto", device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, *, int4_lossless: bool = False) -> tuple[str, str]:
    """("none", "int8" or "int4", why) for decoding a model in ``dtype`` on ``device``: as asked, or for
    "auto" on a CPU: int4 where ``int4_lossless`` (the model's matrices are already on a 4-bit grid,
    :func:`on_int4_grid`: int4 keeps them exactly, int8 would round them again, and it reads half the
    bytes) and its matrix-vector product beat ``dtype``'s by INT8_MIN_SPEEDUP; else int8 if its did;
    else "none" (on CUDA always: the kernels used are CPU ones)."""
    _checks.one_of("quantize", requested, QUANTIZE_CHOICES)
    if requested != "auto":
        return requested, "asked for"
    if torch.device(device).type != "cpu":
        return "none", f"int8/int4 are decoded with CPU kernels only; {device} keeps {str(dtype).removeprefix('torch.')}"
    speedups = quantized_speedups(dtype)
    pays = [q for q in (("int4", "int8") if int4_lossless else ("int8",)) if speedups[q] >= INT8_MIN_SPEEDUP]
    best = pays[0] if pays else max(("int8", "int4") if int4_lossless else ("int8",), key=speedups.get)
    name = str(dtype).removeprefix("torch.")
    unused = "" if int4_lossless else "; int4 only for weights already on a 4-bit grid (ask --quantize int4)"
    if pays:
        lossless = ", the weights' own 4-bit codes" if best == "int4" else ""
        return best, f"an {best} matrix-vector product measured {speedups[best]:.1f}× faster than {name} here{lossless}{unused}"
    return "none", (f"an {best} matrix-vector product measured {speedups[best]:.2f}× {name}'s speed here, short of the "
                    f"{INT8_MIN_SPEEDUP}× that pays for its rounding{unused}")
