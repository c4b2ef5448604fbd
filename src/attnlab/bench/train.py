"""Training throughput of GPT presets: tokens/s and MFU, fp32 vs bf16 autocast, eager vs compiled.

A step is what ``attnlab train`` does per optimizer step: forward with targets (+ the MoE aux
loss), backward, gradient clipping, fused AdamW, zeroing the grads. Data are random token ids
(speed does not depend on the text). MFU = model FLOPs per token (attnlab.bench.flops, forward
+ backward) × tokens/s ÷ the measured matmul peak of the dtype the matmuls run in.
"""

from __future__ import annotations

import statistics

import torch

from attnlab import _checks
from attnlab import device as devices
from attnlab.bench.flops import gpt_train_flops_per_token
from attnlab.bench.results import BenchReport, Table
from attnlab.data.batches import random_batches
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.timing import time_call
from attnlab.trainer import Trainer, TrainConfig

# name -> (GPTConfig fields, batch size). Char-level vocab (Tiny Shakespeare has 65 symbols).
PRESETS = {
    "nanogpt-cpu": (dict(n_layer=4, n_head=4, d_model=128, block_size=64), 12),  # nanoGPT's CPU recipe
    "gpt-shakespeare": (dict(n_layer=6, n_head=6, d_model=384, block_size=256), 8),  # nanoGPT shakespeare-char
    "llama-style": (dict(n_layer=6, n_head=6, n_kv_head=2, d_model=384, block_size=256, attention="gqa",
                         positions="rope", norm="rmsnorm", activation="swiglu"), 8),
    "deepseek-style": (dict(n_layer=6, n_head=6, d_model=384, block_size=256, attention="mla", kv_lora_rank=128,
                            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, ffn="moe",
                            n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, n_dense_layers=1,
                            norm="rmsnorm"), 8),
}
VOCAB_SIZE = 65
DTYPES = ("fp32", "bf16")


def preset_config(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of a preset, with any fields replaced."""
    _checks.one_of("preset", name, tuple(PRESETS))
    fields, _ = PRESETS[name]
    return GPTConfig(vocab_size=VOCAB_SIZE, **{**fields, **overrides})


def _trainer(cfg: GPTConfig, batch_size: int, *, dtype: str, compiled: bool, device: torch.device) -> Trainer:
    """attnlab's Trainer with a fresh GPT(cfg), stepping on random tokens in one dtype, eager or compiled."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    batches = random_batches(cfg.vocab_size, batch_size=batch_size, block_size=cfg.block_size)
    precision = devices.Precision({"fp32": "float32", "bf16": "bfloat16"}[dtype], "benchmark row", str(device))
    trainer = Trainer(model, TrainConfig(batch_size=batch_size, compile=compiled), batches, device=device,
                      precision=precision)
    trainer.choose_kernel()
    return trainer


def _timed_step(trainer: Trainer) -> float:
    """Wall time of one optimizer step, as ``attnlab train`` takes it."""
    return time_call(trainer.train_step, trainer.device)


def run_train(*, peak: dict[str, float], presets=tuple(PRESETS), dtypes=DTYPES, compile_presets=(),
              steps: int = 5, warmup: int = 2, overrides: dict | None = None, batch_size: int | None = None,
              device="cpu", progress=None) -> list[dict]:
    """tokens/s and MFU of every (preset, dtype, eager/compiled); one dict each.

    Per preset, the (dtype, mode) variants take their timed steps round-robin after ``warmup``
    untimed steps each (where torch.compile compiles; reported as warmup_s).
    compile_presets: the presets also timed under torch.compile (compiling takes minutes on a CPU).
    overrides: GPTConfig fields applied to every preset (the tests shrink the models with it).
    """
    for name in (*presets, *compile_presets):
        _checks.one_of("preset", name, tuple(PRESETS))
    device = torch.device(device)
    rows = []
    for name in presets:
        cfg = preset_config(name, **(overrides or {}))
        batch = batch_size or PRESETS[name][1]
        flops_per_token = gpt_train_flops_per_token(cfg, cfg.block_size)
        kinds = [(dtype, mode) for mode in ("eager", "compiled")[:2 if name in compile_presets else 1]
                 for dtype in dtypes]
        trainers, warmup_s = {}, {}
        for dtype, mode in kinds:
            if progress:
                progress(f"train: {name}, {dtype}, {mode}")
            trainers[(dtype, mode)] = _trainer(cfg, batch, dtype=dtype, compiled=mode == "compiled", device=device)
            warmup_s[(dtype, mode)] = sum(_timed_step(trainers[(dtype, mode)]) for _ in range(warmup))
        times = {kind: [] for kind in kinds}
        for _ in range(steps):
            for kind, trainer in trainers.items():
                times[kind].append(_timed_step(trainer))
        for (dtype, mode), trainer in trainers.items():
            step_s = statistics.median(times[(dtype, mode)])
            tokens_per_s = batch * cfg.block_size / step_s
            achieved = flops_per_token * tokens_per_s
            rows.append(dict(preset=name, dtype=dtype, mode=mode, batch=batch, block_size=cfg.block_size,
                             params=trainer.raw.num_params(), step_s=step_s, tokens_per_s=tokens_per_s,
                             warmup_s=warmup_s[(dtype, mode)], flops_per_token=flops_per_token,
                             achieved_gflops=achieved / 1e9,
                             mfu=achieved / (peak[dtype] * 1e9) if peak.get(dtype) else None))
        del trainers
    return rows


def train_report(rows: list[dict], *, peak: dict[str, float]) -> BenchReport:
    body = []
    for r in rows:
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        body.append([r["preset"], f"{r['params'] / 1e6:.2f} M", f"{r['batch']}×{r['block_size']}", r["dtype"],
                     r["mode"], f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_token'] / 1e6:.1f}",
                     f"{r['achieved_gflops']:.0f}", mfu, f"{r['warmup_s']:.1f}"])
    table = Table("Training throughput (AdamW step, grad clipping; random tokens)",
                  ["preset", "params", "batch×block", "dtype", "mode", "tokens/s", "MFLOP/token",
                   "GFLOP/s", "MFU", "warm-up s"], body)
    notes = _speedups(rows) + [
        f"- MFU divides by this run's matmul peak: fp32 {peak.get('fp32', 0):.0f} GFLOP/s, "
        f"bf16 {peak.get('bf16', 0):.0f} GFLOP/s; model FLOPs = 3 × forward (causal attention, LM head included, "
        "MoE counts only routed + shared experts).",
        "- presets: " + "; ".join(f"{n}: {_describe(n)}" for n in dict.fromkeys(r["preset"] for r in rows)),
        "- warm-up s: the untimed first steps; for compiled rows it is mostly torch.compile's compile time. "
        "A preset's variants take their timed steps round-robin, so load from other processes hits them alike.",
    ]
    return BenchReport(mode="train", title="GPT training throughput and MFU", tables=[table], notes=notes,
                       figure=lambda path: _plot(rows, path), data=rows)


def _describe(name: str) -> str:
    fields, batch = PRESETS[name]
    return ", ".join(f"{k}={v}" for k, v in fields.items()) + f", batch={batch}"


def _speedups(rows: list[dict]) -> list[str]:
    by = {(r["preset"], r["dtype"], r["mode"]): r["tokens_per_s"] for r in rows}
    lines = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        parts = []
        for mode in ("eager", "compiled"):
            if (preset, "fp32", mode) in by and (preset, "bf16", mode) in by:
                parts.append(f"bf16 ÷ fp32 {mode} {by[(preset, 'bf16', mode)] / by[(preset, 'fp32', mode)]:.2f}×")
        for dtype in DTYPES:
            if (preset, dtype, "eager") in by and (preset, dtype, "compiled") in by:
                parts.append(f"compiled ÷ eager {dtype} {by[(preset, dtype, 'compiled')] / by[(preset, dtype, 'eager')]:.2f}×")
        if parts:
            lines.append(f"- {preset}: " + ", ".join(parts))
    return lines


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    kinds = list(dict.fromkeys((r["dtype"], r["mode"]) for r in rows))
    by = {(r["preset"], r["dtype"], r["mode"]): r["tokens_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(kinds)
    for i, (dtype, mode) in enumerate(kinds):
        ax.bar([j + i * width for j in range(len(presets))], [by.get((p, dtype, mode), 0) for p in presets],
               width=width, label=f"{dtype} {mode}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(presets))], presets)
    ax.set_ylabel("training tokens/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
