"""The machine attnlab runs on, and the choices made from it: device, precision, threads and the
attention kernel — decided here, once, by measuring, so no default assumes a CPU feature it did
not check.

bf16 is a speed lever on some CPUs and a trap on others: with native bf16 (AVX-512 BF16, AMX) a
bf16 matmul runs 2-8× faster than fp32; on an AVX2-only CPU PyTorch emulates it and it runs
~80× slower. So ``choose_precision("auto")`` times a small matmul in each dtype (once per
process and device) and picks bf16 only where it measured faster; on CUDA it takes bf16 where
the GPU supports it. A forced ``"bfloat16"`` on a CPU where it measured slow still runs, with one
logged warning saying how much slower. Nothing here prints: warnings go to the ``attnlab`` logger.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from attnlab.errors import ConfigError
from attnlab.timing import best_seconds, best_seconds_alternating, time_call

log = logging.getLogger("attnlab")

PRECISIONS = ("auto", "float32", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 must beat fp32 by this much to be worth its rounding (and a second code path).
BF16_MIN_SPEEDUP = 1.3
# The explicit attention path must beat SDPA by this much to be chosen (it materialises the weights).
EXPLICIT_MIN_SPEEDUP = 1.25
_PROBE_SIZE = 256  # (256×256)²: 34 MFLOP, ~0.2 ms in fp32, ~15 ms where bf16 is emulated


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (CUDA when present, else CPU), "cpu", "cuda" (this process's GPU under torchrun) or "cuda:N"."""
    if not isinstance(name, str):
        raise ConfigError(f"device={name!r} is not allowed: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} is not available: this torch build sees no CUDA device (use 'cpu' or 'auto')")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        elif not name.removeprefix("cuda:").isdigit():
            raise ConfigError(f"device={name!r} is not allowed: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    elif name != "cpu":
        raise ConfigError(f"device={name!r} is not allowed: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device(name)


def cpu_capability() -> str:
    """The vector ISA PyTorch's CPU kernels use here: "AVX512", "AVX2", "DEFAULT", ... (honours ATEN_CPU_CAPABILITY)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_L2_FALLBACK_BYTES = 1024 * 1024  # where the OS does not say: the smallest per-core L2 of the CPUs measured here


@functools.cache
def l2_cache_bytes() -> int:
    """One core's L2 cache in bytes: from sysconf, else Linux's sysfs, else 1 MiB.

    Work split into cache-sized pieces (the MoE dispatch's chunks of expert rows) sizes them from
    this, because the best size follows the machine: 2 MiB chunks were fastest on an Intel Xeon
    with 2 MiB of L2 per core, and 12% slower than 1 MiB ones on an AMD EPYC with 1 MiB.
    """
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        size = 0
    if size and size > 0:
        return int(size)
    return _l2_from_sysfs("/sys/devices/system/cpu/cpu0/cache") or _L2_FALLBACK_BYTES


def _l2_from_sysfs(root: str) -> int | None:
    """The unified or data L2 size listed under ``root`` (index*/level and index*/size, e.g. "1024K")."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        if level != "2" or kind == "Instruction":
            continue
        units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
        try:
            return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (ValueError, IndexError):
            continue
    return None


def _probe_matrices(dev: torch.device, size: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two (size×size) matrices every matmul probe multiplies: the same values (seed 0) in any dtype."""
    generator = torch.Generator(device=dev).manual_seed(0)
    return tuple(torch.randn(size, size, generator=generator, device=dev).to(TORCH_DTYPES[dtype]) for _ in range(2))


@functools.cache
def _matmul_gflops(device: str, dtype: str, size: int, threads: int) -> float:
    dev = torch.device(device)
    a, b = _probe_matrices(dev, size, dtype)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, b), repeats=5, device=dev, give_up_after=0.5) / 1e9


def matmul_gflops(dtype: str, device: torch.device | str = "cpu", size: int = _PROBE_SIZE) -> float:
    """GFLOP/s of a (size×size) @ (size×size) matmul in ``dtype`` ("float32", "bfloat16" or
    "float16"), the best of a few calls; measured once per process, device, size and thread count."""
    device = torch.device(device)
    return _matmul_gflops(str(device), dtype, size, torch.get_num_threads())


@dataclass(frozen=True)
class Precision:
    """The dtype work runs in and why; ``autocast()`` is the context that applies it to fp32 modules."""

    dtype: str  # "float32" or "bfloat16"
    reason: str  # one line, for logs, reports and results files
    device: str = "cpu"
    bf16_speedup: float | None = None  # bf16 ÷ fp32 matmul GFLOP/s measured here (None where not measured)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def autocast(self):
        """A fresh context manager: bf16 autocast on this device, or nothing for fp32."""
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.torch_dtype)

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "reason": self.reason, "bf16_speedup": self.bf16_speedup}


def bf16_speedup(device: torch.device | str = "cpu") -> float:
    """bf16 ÷ fp32 matmul speed measured on ``device`` (> 1: bf16 is faster), the two timed in
    alternating rounds; measured once per process, device and thread count."""
    device = torch.device(device)
    return _bf16_speedup(str(device), _PROBE_SIZE, torch.get_num_threads())


@functools.cache
def _bf16_speedup(device: str, size: int, threads: int) -> float:
    dev = torch.device(device)
    fp32, bf16 = _probe_matrices(dev, size, "float32"), _probe_matrices(dev, size, "bfloat16")
    seconds = best_seconds_alternating({"float32": lambda: torch.mm(*fp32), "bfloat16": lambda: torch.mm(*bf16)},
                                       device=dev, give_up_after=0.5)
    return seconds["float32"] / seconds["bfloat16"]


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def choose_precision(requested: str = "auto", device: torch.device | str = "cpu") -> Precision:
    """The precision to run in: "float32", "bfloat16", or "auto" (bf16 on CUDA where supported; on a
    CPU bf16 only where its matmul measured ≥ BF16_MIN_SPEEDUP × fp32's)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"dtype={requested!r} is not allowed: expected one of {', '.join(map(repr, PRECISIONS))}")
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if requested == "bfloat16" and not supported:
            raise ConfigError(f"dtype='bfloat16' is not supported by {torch.cuda.get_device_name(device)}: use 'float32' or 'auto'")
        if requested == "float32" or not supported:
            return Precision("float32", "asked for" if requested == "float32" else "this GPU has no bf16", str(device))
        return Precision("bfloat16", "bf16 autocast on a GPU that supports it" if requested == "auto" else "asked for",
                         str(device))
    if requested == "float32":
        return Precision("float32", "asked for", str(device))
    speedup = bf16_speedup(device)
    measured = f"a bf16 matmul measured {_times(speedup)} than fp32 on this CPU ({cpu_capability()})"
    if requested == "bfloat16":
        if speedup < 1.0:
            _warn_once(f"dtype bfloat16 runs here, but this CPU ({cpu_capability()}) has no fast bf16: "
                       f"a bf16 matmul measured {1 / speedup:.0f}× slower than fp32 (dtype auto would use float32)")
        return Precision("bfloat16", f"asked for; {measured}", str(device), speedup)
    if speedup >= BF16_MIN_SPEEDUP:
        return Precision("bfloat16", measured, str(device), speedup)
    if speedup >= 1:
        measured += f", short of the {BF16_MIN_SPEEDUP}× that pays for bf16's rounding"
    return Precision("float32", measured, str(device), speedup)


def _times(ratio: float) -> str:
    return f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.0f}× slower"


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(torch CPU threads to use, why): ``requested`` if given; else the faster of 1 and torch's default
    on a fp32 matmul measured now, the two timed alternately over a few rounds (the best of each), so a
    burst of load from another process cannot decide alone (on a busy machine extra threads spin
    waiting for a core)."""
    if requested is not None:
        return requested, "asked for"
    default = torch.get_num_threads()
    if default == 1:
        return 1, "one core"
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=generator), torch.randn(512, 512, generator=generator)
    def at(threads):
        def call():
            torch.set_num_threads(threads)
            torch.mm(a, b)
        return call
    try:
        best = best_seconds_alternating({1: at(1), default: at(default)})
    finally:
        torch.set_num_threads(default)
    speedup = best[1] / best[default]
    if speedup >= 1.2:
        return default, f"{default} threads measured {speedup:.1f}× one thread's fp32 matmul"
    return 1, f"{default} threads measured only {speedup:.1f}× one thread's fp32 matmul (a busy machine?)"


def choose_attention_kernel(requested: str, attention: torch.nn.Module, x_shape: tuple[int, int, int],
                            precision: Precision) -> tuple[str, str]:
    """(kernel, why) for training ``attention`` on inputs of ``x_shape`` in ``precision``: "fused"
    (SDPA) or "explicit" as asked, or for "auto" the explicit path only where its forward+backward
    measured ≥ EXPLICIT_MIN_SPEEDUP × faster here (a wide margin, so reruns make the same choice).
    The module's own ``fused`` flag is left as it was."""
    if requested in ("fused", "explicit"):
        return requested, "asked for"
    if requested != "auto":
        raise ConfigError(f"attention_kernel={requested!r} is not allowed: expected 'auto', 'fused' or 'explicit'")
    seconds = measure_attention_kernels(attention, x_shape, precision)
    speedup = seconds["fused"] / seconds["explicit"]
    if speedup >= EXPLICIT_MIN_SPEEDUP:
        return "explicit", f"explicit measured {speedup:.2f}× faster than fused (SDPA) here in {precision.dtype}"
    return "fused", f"fused (SDPA) measured {1 / speedup:.2f}× the explicit path's speed here in {precision.dtype}"


def measure_attention_kernels(attention: torch.nn.Module, x_shape, precision: Precision) -> dict[str, float]:
    """Seconds of one forward+backward of ``attention`` per kernel ("fused", "explicit"), best of a few,
    timed alternately so load hits both alike."""
    device = next(attention.parameters()).device
    x = torch.randn(*x_shape, device=device, requires_grad=True)
    was_fused, was_training = attention.fused, attention.training
    attention.train()

    def run(fused: bool):
        def step():
            attention.fused = fused
            with precision.autocast():
                y = attention(x)
            y.float().sum().backward()
        return step

    steps = {"fused": run(True), "explicit": run(False)}
    try:
        for step in steps.values():
            step()  # warm-up
        times = {name: [] for name in steps}
        for _ in range(3):
            for name, step in steps.items():
                times[name].append(time_call(step, device))
    finally:
        attention.fused = was_fused
        attention.train(was_training)
        attention.zero_grad(set_to_none=True)
    return {name: min(t) for name, t in times.items()}


def memory_bandwidth_gbs(device: torch.device | str = "cpu", megabytes: int = 256) -> dict[str, float]:
    """GB/s of a tensor copy (read + write) and of an fp32 matrix-vector product (what decoding reads)."""
    device = torch.device(device)
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    copy_s = best_seconds(lambda: dst.copy_(src), repeats=3, device=device)
    matrix = src.view(4096, n // 4096)
    vector = torch.ones(n // 4096, device=device)
    matvec_s = best_seconds(lambda: matrix @ vector, repeats=3, device=device)
    return {"copy": 2 * n * 4 / copy_s / 1e9, "matvec": n * 4 / matvec_s / 1e9}


def machine_facts(precision: Precision | None = None) -> dict:
    """What every report and results file records: CPU, cores, PyTorch's CPU capability, threads,
    torch version, GPU, date, and the precision used with its reason."""
    facts = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "cpu_capability": cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.date.today().isoformat(),
    }
    if precision is not None:
        facts["precision"] = precision.as_dict()
    return facts


def describe_machine(facts: dict) -> str:
    """One line for reports: "AMD EPYC, 2 cores (AVX2), torch 2.13.0 (2 threads)" + GPU."""
    line = (f"{facts['cpu']}, {facts['cores']} cores ({facts.get('cpu_capability', '?')}), torch {facts['torch']} "
            f"({facts['threads']} threads)")
    return line + (f", GPU {facts['gpu']}" if facts.get("gpu") else "")
