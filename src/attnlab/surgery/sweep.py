"""``attnlab convert --sweep``: quality against KV cache for many conversions of one model.

Every point converts the source afresh (:mod:`attnlab.surgery.convert`) and measures two things:
perplexity on held-out text and KV-cache bytes per token (decoded into the model's own caches).
Points: MLA at several latent ranks (MHA2MLA's d_kv = head_dim/2, /4, /8 per K/V head, with
head_dim/8 RoPE dims) and one that keeps everything (must match the source), other RoPE widths
and the four RoPE-pair criteria at one rank, the activation-aware SVD at every rank, and K/V
heads mean-pooled to every smaller group count. Training-free by default; with ``heal_steps`` every point (and the source) is fine-tuned
for the same number of steps by the one Trainer, next to an MLA GPT trained from scratch for that
budget. Writes results.json, report.md, report.html and ppl_vs_kv.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from attnlab import device as devices
from attnlab.attention.mla import MultiHeadLatentAttention
from attnlab.data.batches import WindowBatches
from attnlab.errors import ConfigError
from attnlab.files import write_json, write_text
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.options import merge
from attnlab.report_blocks import new_figure, render_html, render_markdown, save_figure
from attnlab.surgery.convert import (Source, check_out, check_source, convert, default_rope_dims, full_kv_rank,
                                     input_covariances, kv_bytes_per_token, load_source, perplexity,
                                     rope_pair_scores, calibration_batch, texts)
from attnlab.trainer import TrainConfig, Trainer

RESULTS, REPORT_MD, REPORT_HTML, PLOT = "results.json", "report.md", "report.html", "ppl_vs_kv.png"
TRAIN_CONFIG = "train_config.json"
POINT_KEYS = ("label", "method", "kv_rank", "rope_dims", "rope_select", "svd", "kv_heads", "healed", "train_steps",
              "kv_bytes_per_token", "kv_fraction", "ppl", "seconds")


def _mla(rank: int, rope_dims: int, select: str = "2norm", svd: str = "weights") -> dict:
    return {"method": "mla", "kv_rank": rank, "rope_dims": rope_dims, "rope_select": select, "svd": svd,
            "kv_heads": None}


def _other(method: str, kv_heads: int | None = None) -> dict:
    return {"method": method, "kv_rank": None, "rope_dims": None, "rope_select": None, "svd": None,
            "kv_heads": kv_heads}


def _ranks(cfg: GPTConfig) -> list[int]:
    """MHA2MLA's latent sizes: d_kv = head_dim / 2, / 4, / 8 numbers per K/V head."""
    return sorted({cfg.n_kv_head * max(1, cfg.head_dim // k) for k in (2, 4, 8)}, reverse=True)


def middle_spec(cfg: GPTConfig) -> dict:
    """The MLA point the RoPE variants and the from-scratch model share: the middle rank, default RoPE dims."""
    ranks = _ranks(cfg)
    return _mla(ranks[len(ranks) // 2], default_rope_dims(cfg))


def sweep_specs(cfg: GPTConfig) -> list[dict]:
    """The conversions of the sweep, in report order (see the module docstring)."""
    d, rope, mid = cfg.head_dim, default_rope_dims(cfg), middle_spec(cfg)["kv_rank"]
    specs = [_mla(full_kv_rank(cfg, d), d, "high")]  # every pair kept, full rank: the source itself
    specs += [_mla(rank, rope) for rank in _ranks(cfg)]
    specs += [_mla(mid, dims) for dims in sorted({max(2, rope // 2), min(d, 2 * rope)} - {rope})]
    specs += [_mla(mid, rope, select) for select in ("high", "low", "uniform")]
    specs += [_mla(rank, rope, svd="activations") for rank in _ranks(cfg)]
    specs += [_other("mqa" if n == 1 else "gqa", n) for n in range(cfg.n_kv_head - 1, 0, -1) if cfg.n_kv_head % n == 0]
    return specs


def label(spec: dict) -> str:
    """How a point is named in the report, the plot and the progress lines."""
    if spec["method"] == "original":
        return "original"
    if spec["method"] in ("gqa", "mqa"):
        return f"{spec['method'].upper()} {spec['kv_heads']} K/V head{'s' if spec['kv_heads'] > 1 else ''}"
    prefix = "MLA from scratch" if spec["method"] == "scratch" else "MLA"
    svd = " act-SVD" if spec["svd"] == "activations" and spec["method"] != "scratch" else ""
    return f"{prefix} r={spec['kv_rank']} rope={spec['rope_dims']} {spec['rope_select']}{svd}"


def _convert(source: Source, spec: dict, calibration: dict) -> GPT:
    if spec["method"] == "original":
        return source.model
    return convert(source.model, to=spec["method"], kv_rank=spec["kv_rank"], rope_dims=spec["rope_dims"],
                   rope_select=spec["rope_select"], kv_heads=spec["kv_heads"], svd=spec["svd"] or "weights",
                   **calibration)


def heal_config(source: Source, steps: int) -> TrainConfig:
    """The source run's own training settings for ``steps`` more steps (short warmup, one eval at the end)."""
    saved = {}
    if source.folder is not None and (source.folder / TRAIN_CONFIG).is_file():
        saved = json.loads((source.folder / TRAIN_CONFIG).read_text(encoding="utf-8"))
    return merge(TrainConfig, saved, {"max_steps": steps, "warmup_steps": max(1, steps // 10), "decay_steps": None,
                                      "eval_interval": steps, "eval_iters": 1, "log_interval": steps,
                                      "ckpt_interval": None, "max_time": None, "target_val_loss": None,
                                      "compile": False})


def heal(model: GPT, source: Source, steps: int) -> GPT:
    """Fine-tune ``model`` in place for ``steps`` steps on the source run's training split (the one
    Trainer, the run's settings); MLA layers train in naive mode and go back to their mode after."""
    data = source.dataset()
    if data is None:
        raise ConfigError("heal_steps needs a training run folder (attnlab train's --out, with data/) as the source: "
                          "it fine-tunes on that run's training split")
    cfg = heal_config(source, steps)
    device = devices.resolve_device(cfg.device)
    block = cfg.block_size or model.config.block_size
    batches = WindowBatches(data.tokens("train"), data.tokens("val"), batch_size=cfg.batch_size, block_size=block,
                            seed=cfg.seed, eval_iters=cfg.eval_iters, eval_batch_size=cfg.eval_batch_size,
                            eval_block_size=cfg.eval_block_size or block)
    mla = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    modes = [m.mode for m in mla]
    for m in mla:
        m.mode = "naive"
    model.to(device).train()
    Trainer(model, cfg, batches, device=device, precision=devices.choose_precision(cfg.dtype, device),
            clock="train").fit()
    for m, mode in zip(mla, modes):
        m.mode = mode
    return model.to("cpu").eval()


def _measure(model: GPT, spec: dict, held_out, original: dict | None, started: float, steps: int) -> dict:
    kv = kv_bytes_per_token(model)
    point = {**spec, "label": label(spec), "healed": steps > 0 and spec["method"] != "scratch", "train_steps": steps,
             "kv_bytes_per_token": kv, "kv_fraction": 1.0 if original is None else kv / original["kv_bytes_per_token"],
             "ppl": perplexity(model, held_out), "seconds": time.monotonic() - started}
    return {key: point[key] for key in POINT_KEYS}


def run_points(source: Source, held_out, calibration: dict, heal_steps: int,
               emit: Callable[[dict], None]) -> list[dict]:
    """Every point of the sweep, measured; with heal_steps > 0 each also healed from a copy (the
    training-free point and the source stay as they were), then one MLA trained from scratch."""
    cfg = source.model.config
    specs = [_other("original"), *sweep_specs(cfg)]
    points: list[dict] = []
    total = len(specs) * (2 if heal_steps else 1) + (1 if heal_steps else 0)

    def add(point: dict) -> None:
        points.append(point)
        emit({"event": "point", "index": len(points), "total": total, **point})

    for spec in specs:
        started = time.monotonic()
        model = _convert(source, spec, calibration)
        add(_measure(model, spec, held_out, points[0] if points else None, started, 0))
        if heal_steps:
            started = time.monotonic()
            add(_measure(heal(_fresh_copy(model), source, heal_steps), spec, held_out, points[0], started, heal_steps))
    if heal_steps:
        spec = middle_spec(cfg)
        started = time.monotonic()
        shape = _convert(source, spec, calibration).config
        torch.manual_seed(heal_config(source, heal_steps).seed)
        scratch = heal(GPT(shape), source, heal_steps)
        add(_measure(scratch, {**spec, "method": "scratch"}, held_out, points[0], started, heal_steps))
    return points


def _fresh_copy(model: GPT) -> GPT:
    """A trainable copy of a converted (or the source) model."""
    copy = GPT(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


def run_sweep(spec: str, out, *, text: str | None = None, heal_steps: int = 0, overwrite: bool = False,
              command: str = "", progress: Callable[[dict], None] | None = None) -> dict:
    """The whole sweep of ``spec`` ("smollm2" or a GPT folder) into ``out``; returns results.json
    plus the report's path. Every check runs before anything is written."""
    if not isinstance(heal_steps, int) or isinstance(heal_steps, bool) or heal_steps < 0:
        raise ConfigError(f"heal_steps={heal_steps!r} is not allowed: expected 0 (training-free) or more steps")
    out = check_out(out, overwrite, spec)
    started = time.monotonic()
    torch.set_num_threads(devices.choose_threads(None)[0])  # measured: all cores can lose to one on a busy machine
    source = load_source(spec)
    cfg = check_source(source.model)
    if heal_steps and source.dataset() is None:
        raise ConfigError("heal_steps needs a training run folder (attnlab train's --out, with data/) as the source: "
                          "it fine-tunes on that run's training split")
    calib, held_out, text_name = texts(source, text)
    batch = calibration_batch(source.model, calib)
    calibration = {"scores": rope_pair_scores(source.model, batch), "covariances": input_covariances(source.model, batch)}
    points = run_points(source, held_out, calibration, heal_steps, progress or (lambda event: None))
    results = {
        "source": source.name,
        "source_attention": {"attention": cfg.attention, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
                             "head_dim": cfg.head_dim, "n_layer": cfg.n_layer},
        "text": {"name": text_name, "calibration_tokens": len(calib), "held_out_tokens": len(held_out)},
        "dtype": str(source.model.wte.weight.dtype).removeprefix("torch."),
        "heal_steps": heal_steps,
        **_split_points(points),
        "wall_s": time.monotonic() - started,
        "command": command,
        "machine": devices.machine_facts(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS, results)
    write_report(out, {**results, "points": points})
    return {**results, "report": str(out / REPORT_MD)}


def _split_points(points: list[dict]) -> dict:
    """results.json's shape: the untouched source as "original" ({"ppl", "kv_bytes_per_token", ...}), the
    converted models as "points" (method mla | gqa | mqa), and what they are judged against when healing —
    the source trained as long, an MLA trained from scratch as long — as "references"."""
    original = next(p for p in points if p["method"] == "original" and not p["healed"])
    converted = [p for p in points if p["method"] in ("mla", "gqa", "mqa")]
    references = [p for p in points if p is not original and p not in converted]
    return {"original": original, "points": converted, "references": references}


def _table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    base = points[0]["ppl"]
    headers = ["point", "trained steps", "KV bytes / token", "of the original", "ppl", "Δ ppl", "s"]
    rows = [[p["label"], str(p["train_steps"]), f"{p['kv_bytes_per_token']:,}", f"{100 * p['kv_fraction']:.2f}%",
             f"{p['ppl']:.3f}", f"{p['ppl'] - base:+.3f}", f"{p['seconds']:.1f}"] for p in points]
    return headers, rows


def _plot(out: Path, results: dict) -> None:
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    styles = {"original": ("*", "#000000"), "mla": ("o", "#1f77b4"), "gqa": ("s", "#2ca02c"),
              "mqa": ("s", "#2ca02c"), "scratch": ("X", "#d62728")}
    for p in results["points"]:
        marker, color = styles[p["method"]]
        ax.scatter(p["kv_bytes_per_token"], p["ppl"], marker=marker, s=60 if p["method"] == "original" else 30,
                   color=color, facecolors=color if not p["healed"] else "none", zorder=3)
        ax.annotate(p["label"] + (" +heal" if p["healed"] else ""), (p["kv_bytes_per_token"], p["ppl"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("KV cache bytes per token (all layers, fp32, measured)")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_title(f"{results['source']}: quality vs KV cache ({'healed: hollow' if results['heal_steps'] else 'no training'})")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, out / PLOT)


def _seen(results: dict) -> list[str]:
    """What the sweep measured, in sentences: the exact point, the MLA ranks, pooling."""
    points = results["points"]
    base = points[0]
    lines = []
    for p in points[1:]:
        if p["train_steps"] == 0 and p["method"] == "mla" and p["rope_dims"] == results["source_attention"]["head_dim"]:
            lines.append(f"keeping everything ({p['label']}): ppl {p['ppl']:.4f} vs the original's {base['ppl']:.4f}, "
                         f"{p['kv_bytes_per_token']:,} vs {base['kv_bytes_per_token']:,} bytes per token")
    free = [p for p in points if p["train_steps"] == 0 and p["method"] != "original"]
    best = min(free, key=lambda p: (p["kv_fraction"], p["ppl"])) if free else None
    if best is not None:
        lines.append(f"smallest cache without training: {best['label']} at {100 * best['kv_fraction']:.2f}% of the "
                     f"original's bytes, ppl {best['ppl']:.3f} ({best['ppl'] / base['ppl']:.2f}× the original)")
    healed = [p for p in points if p["healed"] and p["kv_fraction"] < 1]
    if healed:
        best = min(healed, key=lambda p: p["ppl"])
        again = next(p for p in points if p["healed"] and p["method"] == "original")
        scratch = next(p for p in points if p["method"] == "scratch")
        lines.append(f"after {results['heal_steps']} steps: the best healed conversion with a smaller cache is "
                     f"{best['label']} (ppl {best['ppl']:.3f} at {100 * best['kv_fraction']:.2f}% of the bytes); the "
                     f"original trained as long reaches {again['ppl']:.3f}, MLA trained from scratch as long "
                     f"{scratch['ppl']:.3f}")
    return lines


def write_report(out: Path, results: dict) -> None:
    """report.md, report.html and ppl_vs_kv.png from results.json's contents."""
    _plot(out, results)
    headers, rows = _table(results["points"])
    text = results["text"]
    blocks = [
        ("h1", f"attnlab convert --sweep: {results['source']}"),
        ("p", f"Held-out text: {text['name']} ({text['held_out_tokens']:,} tokens; RoPE pairs calibrated on "
              f"{text['calibration_tokens']:,} other tokens). {results['dtype']} weights; KV bytes are measured on the "
              f"model's own caches. Wall time {results['wall_s']:.0f} s."),
        ("list", _seen(results)),
        ("img", PLOT, "perplexity against KV-cache bytes per token"),
        ("table", headers, rows),
        ("p", "MLA r = latent width (kv_lora_rank, shared by every head), rope = per-head dims that keep RoPE "
              "(one RoPE key per original K/V head), then which pairs keep it; [W_K_nope; W_V] factored by the "
              "truncated SVD of the weights (MHA2MLA) or, act-SVD, of the weights times the calibration inputs' "
              "covariance root (keeps W·X best). GQA/MQA: K/V heads mean-pooled."),
        ("pre", f"command: {results['command']}\nmachine: {devices.describe_machine(results['machine'])}\n"
                f"date: {results['machine']['date']}"),
    ]
    write_text(out / REPORT_MD, render_markdown(blocks))
    write_text(out / REPORT_HTML, render_html(blocks, out, f"attnlab convert --sweep: {results['source']}"))
