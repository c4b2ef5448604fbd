"""``attnlab bench``: runs the chosen benchmark modes (the matmul peak first) and writes each one's
results file through :mod:`attnlab.bench.results`."""

from __future__ import annotations

from pathlib import Path

import torch

from attnlab import _checks
from attnlab import device as devices
from attnlab.bench import attention, decode, moe, peak, smollm2, train
from attnlab.bench.results import BenchReport, write_report

MODES = ("peak", "attention", "decode", "moe", "train", "smollm2")
# Sizes small enough for the test suite (seconds), same code paths as the full runs.
QUICK = {
    "peak": dict(size=128, repeats=2),
    "attention": dict(batch=1, seqs=(16,), d_model=32, n_heads=4, repeats=1, warmup=1),
    "decode": dict(contexts=(8, 16), d_model=32, n_heads=4, n_layer=1, vocab_size=16, new_tokens=2,
                   recompute_tokens=1),
    "moe": dict(cases=tuple(case.scaled(d_model=32, shape=(2, 16)) for case in moe.CASES), repeats=1, warmup=1),
    "train": dict(overrides=dict(n_layer=1, n_head=2, d_model=32, block_size=16, kv_lora_rank=16,
                                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_dense_layers=0),
                  batch_size=2, steps=1, warmup=1),
    "smollm2": dict(prompts=smollm2.PROMPTS[:1], new_tokens=2),
}
FULL = {
    "peak": dict(size=2048, repeats=5),
    "attention": dict(batch=4, seqs=(512, 2048), d_model=768, n_heads=12, repeats=3, warmup=1),
    "decode": dict(contexts=(256, 1024, 4096), d_model=768, n_heads=12, n_layer=4, vocab_size=256, new_tokens=16,
                   recompute_tokens=3),
    "moe": dict(cases=moe.CASES, repeats=15, warmup=2),
    "train": dict(steps=5, warmup=2),
    "smollm2": dict(prompts=smollm2.PROMPTS, new_tokens=128, rounds=1),  # 4 prompts × 4 rows: minutes
}
COMPILED_PRESETS = ("nanogpt-cpu",)  # torch.compile takes minutes per model on 2 CPU cores


DTYPE_CHOICES = ("auto", "fp32", "bf16", "both")


def bench_dtypes(choice: str, device: torch.device) -> tuple[tuple[str, ...], str]:
    """(dtypes to time, why): "fp32", "bf16", "both", or "auto" — fp32, plus bf16 where it measured
    faster than fp32 here (timing bf16 where PyTorch emulates it would take an hour and show nothing new)."""
    _checks.one_of("dtype", choice, DTYPE_CHOICES)
    if choice != "auto":
        return {"fp32": ("fp32",), "bf16": ("bf16",), "both": ("fp32", "bf16")}[choice], "asked for"
    precision = devices.choose_precision("auto", device)
    if precision.dtype == "bfloat16":
        return ("fp32", "bf16"), precision.reason
    return ("fp32",), f"bf16 rows left out: {precision.reason}"


def run_benchmarks(modes, *, out_dir, command: str, quick: bool = False, repeats: int | None = None,
                   device: str = "auto", compile_presets=None, threads: int | None = None, dtype: str = "auto",
                   progress=None) -> list[tuple[BenchReport, list[Path]]]:
    """Run the given modes (the peak is always measured first) and write each one's results.

    compile_presets: train presets also timed under torch.compile ("all" for every preset; default
    COMPILED_PRESETS, none with ``quick``). threads: torch CPU threads for the whole run.
    dtype: which precisions to time (see :func:`bench_dtypes`).
    Returns (report, written paths) per mode, in the order run.
    """
    for mode in modes:
        _checks.one_of("mode", mode, MODES)
    _checks.one_of("device", device, ("auto", "cpu", "cuda"))
    device = str(devices.resolve_device(device))
    sizes = {mode: dict(kwargs) for mode, kwargs in (QUICK if quick else FULL).items()}
    if repeats is not None:
        for mode in ("peak", "attention", "moe"):
            sizes[mode]["repeats"] = _checks.positive_int("repeats", repeats)
        sizes["train"]["steps"] = repeats
    if compile_presets is None:
        compile_presets = () if quick else COMPILED_PRESETS
    compiled = tuple(train.PRESETS) if compile_presets == "all" else tuple(compile_presets)
    for name in compiled:
        _checks.one_of("compile preset", name, tuple(train.PRESETS))
    if threads is not None:
        torch.set_num_threads(_checks.positive_int("threads", threads))
    dtypes, dtypes_reason = bench_dtypes(dtype, torch.device(device))
    machine = devices.machine_facts()
    machine["precision"] = {"dtype": " and ".join(dtypes), "reason": dtypes_reason}
    done = []

    def write(report: BenchReport, facts: dict | None = None) -> None:
        done.append((report, write_report(report, out_dir, command=command, machine=facts or machine)))

    if progress:
        progress(f"peak: matmul GFLOP/s, {' and '.join(dtypes)}")
    measured = peak.measure_peak(device=device, dtypes=dtypes, **sizes["peak"])
    if "peak" in modes:
        write(peak.peak_report(measured, size=sizes["peak"]["size"]))
    if "attention" in modes:
        kw = sizes["attention"]
        rows = attention.run_attention(peak=measured, device=device, progress=progress, dtypes=dtypes, **kw)
        checks = attention.fused_mha_op_check(dtypes=dtypes) if device == "cpu" else []
        if "bf16" in dtypes:
            checks += attention.sdpa_bf16_speedup(batch=kw["batch"], seqs=kw["seqs"], d_model=kw["d_model"],
                                                  n_heads=kw["n_heads"], device=device)
        write(attention.attention_report(rows, batch=kw["batch"], d_model=kw["d_model"], n_heads=kw["n_heads"],
                                         peak=measured, extra_notes=checks))
    if "decode" in modes:
        kw = sizes["decode"]
        rows = decode.run_decode(device=device, progress=progress, **kw)
        write(decode.decode_report(rows, d_model=kw["d_model"], n_heads=kw["n_heads"], n_layer=kw["n_layer"],
                                   vocab_size=kw["vocab_size"]))
    if "moe" in modes:  # fp32 unless bf16 was asked for by name: the targets are fp32
        moe_dtypes = dtypes if dtype in ("bf16", "both") else ("fp32",)
        moe_machine = {**machine, "precision": {"dtype": " and ".join(moe_dtypes), "reason": "the MoE targets are "
                       "fp32; bf16 rows only when --dtype bf16 or both asks" if dtype not in ("bf16", "both")
                       else dtypes_reason}}
        write(moe.moe_report(moe.run_moe(peak_gflops=measured["fp32"], device=device, progress=progress,
                                         dtypes=moe_dtypes, **sizes["moe"])), moe_machine)
    if "train" in modes:
        kw = sizes["train"]
        rows = train.run_train(peak=measured, device=device, progress=progress, compile_presets=compiled,
                               dtypes=dtypes, **kw)
        write(train.train_report(rows, peak=measured))
    if "smollm2" in modes:  # on the CPU whatever the device: the int8 kernel and the baseline are CPU ones
        write(smollm2.smollm2_report(smollm2.run_smollm2(dtypes=dtypes, progress=progress, **sizes["smollm2"])))
    return done
