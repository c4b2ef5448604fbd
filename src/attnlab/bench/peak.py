"""This machine's practical ceiling: GFLOP/s of one large square matmul in fp32 and in bf16.

Measured at the start of every run and used as the denominator of "% of peak" and MFU, so the
other tables say how close a model gets to what the hardware does on its best-shaped work.
"""

from __future__ import annotations

import torch

from attnlab import device as devices
from attnlab.timing import median_seconds
from attnlab.bench.results import BenchReport, Table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(dtype: str, *, size: int = 2048, repeats: int = 5, warmup: int = 2, device="cpu") -> float:
    """Best GFLOP/s of (size, size) @ (size, size) in ``dtype`` ("fp32" or "bf16") over ``repeats`` calls.

    A ceiling, so the fastest call counts (on a shared machine the median would sink with the load
    and models could land above "100% of peak")."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(DTYPES[dtype])
    b = torch.randn(size, size, generator=generator, device=device).to(DTYPES[dtype])
    for _ in range(warmup):
        torch.mm(a, b)
    seconds = min(median_seconds(lambda: torch.mm(a, b), warmup=0, repeats=1, device=device) for _ in range(repeats))
    return 2 * size**3 / seconds / 1e9


def measure_peak(*, size: int = 2048, repeats: int = 5, device="cpu", dtypes=tuple(DTYPES)) -> dict[str, float]:
    """GFLOP/s per dtype name, e.g. {"fp32": 310.0, "bf16": 1650.0}: at ``size`` for ``dtypes``, and
    from attnlab.device's small probe for the others (a full-size matmul where bf16 is emulated takes minutes)."""
    probe = {"fp32": "float32", "bf16": "bfloat16"}
    return {name: matmul_gflops(name, size=size, repeats=repeats, device=device) if name in dtypes
            else devices.matmul_gflops(probe[name], device) for name in DTYPES}


def has_amx() -> bool:
    """True when the CPU advertises Intel AMX bf16 tiles (the bf16 lever the targets assume)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def peak_report(peak: dict[str, float], *, size: int) -> BenchReport:
    rows = [[name, f"{gflops:.0f}", f"{gflops / peak['fp32']:.2f}×"] for name, gflops in peak.items()]
    amx = "this CPU has AMX" if has_amx() else "this CPU has no AMX tiles (bf16 runs on AVX-512 BF16 or emulation)"
    return BenchReport(
        mode="peak",
        title="Matmul peak of this machine",
        tables=[Table(f"({size}×{size}) @ ({size}×{size})", ["dtype", "GFLOP/s", "÷ fp32"], rows)],
        notes=[f"- the best call after warm-up (a ceiling, not a median); the denominators of '% of peak' and MFU "
               f"in the other tables; {amx}"],
        data=[{"dtype": name, "gflops": gflops, "size": size} for name, gflops in peak.items()],
    )
